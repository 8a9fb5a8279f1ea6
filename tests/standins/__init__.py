"""Stand-ins that fail the way real broken parts do, for tests of the failure paths."""
