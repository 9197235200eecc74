"""Calling a WSGI app (optuna-dashboard's) in-process, without a server."""

import io


def wsgi_get(app, path: str, query: str = "") -> bytes:
    """The body of ``GET path?query``; fails unless the status is 200."""
    status = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
    }
    body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
    assert status[0].startswith("200"), status
    return body
