"""The server's settings: one typed object, from the command line and the environment."""
