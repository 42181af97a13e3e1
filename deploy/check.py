#!/usr/bin/env python3
"""Checks the deployment files without a Docker engine or a cluster.

- Every Unhidra service of docker-compose.yml is started from the built
  binaries with the compose command and environment, with only the addresses
  moved to loopback (NATS, Redis, a fresh Postgres database, free ports). Each must
  become ready, pass its container HEALTHCHECK command, and serve a Prometheus
  exposition that `promtool check metrics` accepts; a user registers, logs in
  and creates a room through the gateway, the one public entry point.
- Every Grafana dashboard is valid JSON and queries only metrics that those
  services really export; so do the Prometheus alert rules.

Usage: deploy/check.py <directory of built binaries>
Environment: UNHIDRA_TEST_NATS_URL, UNHIDRA_TEST_REDIS_URL,
UNHIDRA_TEST_POSTGRES_URL (loopback defaults).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATS = os.environ.get("UNHIDRA_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS = os.environ.get("UNHIDRA_TEST_REDIS_URL", "redis://127.0.0.1:6379")
POSTGRES = os.environ.get(
    "UNHIDRA_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres"
)


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def log_path(name):
    return os.path.join(tempfile.gettempdir(), f"unhidra-check-{name}.log")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, token=None):
    request = urllib.request.Request(url, method=method)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, data=data, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def fresh_database():
    name = f"unhidra_check_{uuid.uuid4().hex[:12]}"
    subprocess.run(
        ["psql", POSTGRES, "-q", "-c", f'CREATE DATABASE "{name}"'], check=True
    )
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


def start_compose_services(binaries):
    compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
    database = fresh_database()
    prefix = f"check{uuid.uuid4().hex[:8]}"
    started = {}
    # auth-api and chat-service answer the others' requests: start them first.
    order = ["auth-api", "chat-service", "history-service", "audit-service", "gateway"]
    services = compose["services"]
    for name in order + [n for n in services if n not in order]:
        service = services[name]
        if service.get("image") != "unhidra:local":
            continue
        command = service["command"]
        binary = os.path.join(binaries, command[0])
        if not os.access(binary, os.X_OK):
            fail(f"compose service {name} runs `{command[0]}`, which was not built")
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        port = free_port()
        env["UNHIDRA_BIND"] = f"127.0.0.1:{port}"
        env["UNHIDRA_NATS_URL"] = NATS
        if "UNHIDRA_REDIS_URL" in env:
            env["UNHIDRA_REDIS_URL"] = REDIS
        if "UNHIDRA_DATABASE_URL" in env:
            env["UNHIDRA_DATABASE_URL"] = database
        env["UNHIDRA_BUS_PREFIX"] = prefix
        # Where a service finds another (`http://auth-api:9200`): that
        # service's loopback port here.
        for key, value in list(env.items()):
            found = re.fullmatch(r"http://([a-z-]+):\d+", value)
            if key.endswith("_URL") and found:
                if found.group(1) not in started:
                    fail(f"{name}: {key} names {found.group(1)}, not started before it")
                env[key] = f"http://127.0.0.1:{started[found.group(1)][1]}"
        # Loopback stands in for the gateway's fixed address.
        if "UNHIDRA_TRUSTED_PROXIES" in env:
            env["UNHIDRA_TRUSTED_PROXIES"] = "127.0.0.1"
        # Each stream reserves this much of the shared NATS's storage; the
        # test suite deletes `check...` streams an hour old.
        env["UNHIDRA_STREAM_MAX_BYTES"] = str(8 * 1024 * 1024)
        process = subprocess.Popen(
            [binary, *command[1:]],
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=open(log_path(name), "w"),
        )
        started[name] = (process, port, env, binary)
        wait_ready(name, port, process)
    return started


def wait_ready(name, port, process):
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            fail(f"{name} exited with {process.returncode}; see {log_path(name)}")
        try:
            status, _ = http("GET", f"http://127.0.0.1:{port}/readyz")
            if status == 200:
                print(f"ok: {name} ready on {port}")
                return
        except OSError:
            pass
        time.sleep(0.2)
    fail(f"{name} never became ready")


def check_running(started):
    # Everything through the one public entry point, the gateway.
    auth = chat = f"http://127.0.0.1:{started['gateway'][1]}"
    email = f"check-{uuid.uuid4().hex[:8]}@example.com"
    status, _ = http("POST", f"{auth}/api/v1/auth/register", {"email": email, "password": "correct horse battery"})
    if status != 201:
        fail(f"register answered {status}")
    status, body = http("POST", f"{auth}/api/v1/auth/login", {"email": email, "password": "correct horse battery"})
    if status != 200:
        fail(f"login answered {status}")
    token = json.loads(body)["access_token"]
    status, body = http("POST", f"{chat}/api/v1/rooms", {"name": "check", "visibility": "public"}, token)
    if status != 201:
        fail(f"room creation answered {status}: {body!r}")
    print("ok: register, login and room creation through the gateway")
    families = set()
    for name, (process, port, env, binary) in started.items():
        health = subprocess.run(
            [binary, "healthcheck"], env={**os.environ, **env}, capture_output=True
        )
        if health.returncode != 0:
            fail(f"{name}: HEALTHCHECK command failed: {health.stderr[-300:]!r}")
        status, body = http("GET", f"http://127.0.0.1:{port}/readyz")
        limits = json.loads(body)["checks"]["rate_limits"]
        expected = "redis" if "UNHIDRA_REDIS_URL" in env else "local"
        if limits != expected:
            fail(f"{name}: rate limits kept in {limits!r}, expected {expected!r}")
        status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
        if status != 200:
            fail(f"{name}: /metrics answered {status}")
        promtool = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True
        )
        # promtool exits 3 for lint warnings only (none expected), 1 for errors.
        if promtool.returncode != 0:
            fail(f"{name}: promtool check metrics: {promtool.stdout!r} {promtool.stderr!r}")
        for line in body.decode().splitlines():
            if line.startswith("# TYPE "):
                families.add(line.split()[2])
        print(f"ok: {name} healthcheck and metrics")

    return families


def metric_names(text):
    return set(re.findall(r"\bunhidra_[a-z0-9_]+", text))


def exported(name, families):
    if name in families:
        return True
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in families:
            return True
    return False


def check_queries(families):
    dashboards = os.path.join(ROOT, "deploy", "grafana", "dashboards")
    for file in sorted(os.listdir(dashboards)):
        dashboard = json.load(open(os.path.join(dashboards, file)))
        exprs = [
            target["expr"]
            for panel in dashboard.get("panels", [])
            for target in panel.get("targets", [])
        ]
        if not exprs:
            fail(f"{file}: no queries")
        for expr in exprs:
            for name in metric_names(expr):
                if not exported(name, families):
                    fail(f"{file}: queries {name}, which no service exports")
        print(f"ok: {file}: {len(exprs)} queries over exported metrics")
    rules = yaml.safe_load(open(os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")))
    for group in rules["groups"]:
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                if not exported(name, families):
                    fail(f"alert {rule['alert']} uses {name}, which no service exports")
    print("ok: alert rules use exported metrics")


def main():
    if len(sys.argv) != 2:
        fail("usage: deploy/check.py <directory of built binaries>")
    started = start_compose_services(sys.argv[1])
    try:
        families = check_running(started)
        check_queries(families)
    finally:
        for process, *_ in started.values():
            process.send_signal(signal.SIGTERM)
        for name, (process, *_) in started.items():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                fail(f"{name} did not exit within 15 s of SIGTERM")
            if process.returncode != 0:
                fail(f"{name} exited with {process.returncode} after SIGTERM")
    print("ok: every service exited cleanly on SIGTERM")


if __name__ == "__main__":
    main()
