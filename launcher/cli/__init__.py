"""The `launch` command: parses arguments, calls the planning side or a cluster executor, prints."""
