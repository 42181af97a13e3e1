#!/usr/bin/env python3
"""The README's walkthrough against a running deployment, through one
address: two users register and log in, one makes a room, the other joins,
a message goes over the WebSocket and comes back from history.

Usage: compose_walkthrough.py <base URL, e.g. http://127.0.0.1:9000>
"""

import json
import sys
import urllib.error
import urllib.request
import uuid

from websockets.sync.client import connect

BASE = sys.argv[1].rstrip("/")
WS = BASE.replace("http", "ws", 1) + "/ws"


def call(method, path, body=None, token=None):
    request = urllib.request.Request(BASE + path, method=method)
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def expect(answer, status, what):
    if answer[0] != status:
        sys.exit(f"{what}: {answer[0]} {answer[1]}")
    return answer[1]


def user(name):
    email = f"{name}-{uuid.uuid4().hex[:8]}@example.com"
    credentials = {"email": email, "password": "correct horse battery"}
    expect(call("POST", "/api/v1/auth/register", {**credentials, "display_name": name}), 201, "register")
    return expect(call("POST", "/api/v1/auth/login", credentials), 200, "login")["access_token"]


ann, bob = user("ann"), user("bob")
room = expect(call("POST", "/api/v1/rooms", {"name": "general", "visibility": "public"}, ann), 201, "room")["room_id"]
expect(call("POST", f"/api/v1/rooms/{room}/join", {}, bob), 200, "join")

with connect(WS, subprotocols=["unhidra.v1", f"bearer.{bob}"], open_timeout=10) as bob_ws, \
        connect(WS, subprotocols=["unhidra.v1", f"bearer.{ann}"], open_timeout=10) as ann_ws:
    ann_ws.send(json.dumps({"type": "send", "id": "c1", "room": room, "body": "hello bob"}))
    ack = None
    while ack is None:
        frame = json.loads(ann_ws.recv(timeout=10))
        if frame["type"] == "ack":
            ack = frame
    message = None
    while message is None:
        frame = json.loads(bob_ws.recv(timeout=10))
        if frame["type"] == "message":
            message = frame
    assert message["body"] == "hello bob" and message["seq"] == ack["seq"] == 1, (ack, message)

for _ in range(50):
    page = expect(call("GET", f"/api/v1/rooms/{room}/messages?limit=50", token=bob), 200, "history")
    if page["messages"]:
        break
    __import__("time").sleep(0.2)
bodies = [m["body"] for m in page["messages"]]
assert bodies == ["hello bob"], bodies
print(f"ok: register, login, room, join, a WebSocket message (seq {ack['seq']}) and history, all through {BASE}")
