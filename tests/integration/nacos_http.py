"""Nacos's HTTP open API as a client sees it (stdlib only): log in, call with or without a token."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request


class Reply:
    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:300]!r})"


def call(address: str, method: str, path: str, params: dict | None = None, *, token: str | None = None,
         form: dict | None = None) -> Reply:
    """``method`` ``http://address/nacos<path>?params`` (with ``accessToken`` when given), form body ``form``."""
    query = dict(params or {})
    if token:
        query["accessToken"] = token
    url = f"http://{address}/nacos{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return Reply(reply.status, reply.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read())


def login(address: str, username: str, password: str) -> Reply:
    return call(address, "POST", "/v1/auth/users/login", form={"username": username, "password": password})


def token(address: str, username: str, password: str) -> str:
    reply = login(address, username, password)
    assert reply.status == 200, reply
    return reply.json()["accessToken"]
