"""`dllama-api`: the OpenAI-compatible HTTP server (docs/api.md). Its flags are in `dllama.commands.api`; `server.serve` runs it."""
