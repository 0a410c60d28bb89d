"""What comes in: a chat message with its pictures and videos, checked, decoded within the
process's pixel budget, and turned into a `Conversation` the engine can encode."""
