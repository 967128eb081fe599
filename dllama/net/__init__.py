"""Tensor parallelism over TCP: the wire protocol (`protocol`, sans-I/O), framed sockets (`transport`),
the socket collectives (`exchange`), the root side (`root.connect_workers`) and the worker (`worker`)."""


def probe(host: str, port: int, timeout: float = 3.0) -> dict:
    """What the worker at host:port is doing (see `dllama.net.worker.probe`); raises DllamaError."""
    from dllama.net.worker import probe as _probe

    return _probe(host, port, timeout)
