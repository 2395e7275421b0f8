"""File copy on the agent: where an instance's files are, as whom, and the copy session."""
