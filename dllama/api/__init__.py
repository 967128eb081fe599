"""`dllama-api`: the OpenAI-compatible HTTP server (docs/api.md). Entry points: `server.add_arguments`, `server.run`."""
