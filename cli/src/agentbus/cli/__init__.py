"""agentbus command line: submit and follow tasks, run the embedded stack."""
