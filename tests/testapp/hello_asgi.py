"""The smallest ASGI app: answers "hello" with its path (for a server started from the command line)."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = f"hello {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
