"""Command-line front end of poolformer: parses options, calls the library, renders the results."""
