"""The gateway's real ports: memory over NATS request/reply, the events stream."""
