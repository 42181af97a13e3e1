#!/usr/bin/env python3
"""A stand-in for the grafana/grafana image, for checking the compose stack
on a machine that cannot pull images. It is not Grafana: it reads Grafana's
provisioning files as Grafana does (datasources and dashboard providers under
/etc/grafana/provisioning, dashboards from each provider's `options.path`),
refuses what Grafana would refuse (bad YAML, a provider path without
dashboards, dashboard JSON that does not parse), and answers the few HTTP API
calls a deployment check makes, with the admin credentials from
GF_SECURITY_ADMIN_USER / GF_SECURITY_ADMIN_PASSWORD:

  GET /api/health
  GET /api/datasources
  GET /api/search?query=...
  GET /api/dashboards/uid/<uid>
"""

import base64
import glob
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

PROVISIONING = os.environ.get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
USER = os.environ.get("GF_SECURITY_ADMIN_USER", "admin")
PASSWORD = os.environ.get("GF_SECURITY_ADMIN_PASSWORD", "admin")


def provisioned(kind):
    items = []
    for path in sorted(glob.glob(os.path.join(PROVISIONING, kind, "*.y*ml"))):
        document = yaml.safe_load(open(path)) or {}
        items.extend(document.get(kind if kind == "datasources" else "providers", []))
    return items


def load():
    datasources = provisioned("datasources")
    dashboards = {}
    for provider in provisioned("dashboards"):
        path = provider["options"]["path"]
        files = sorted(glob.glob(os.path.join(path, "*.json")))
        if not files:
            sys.exit(f"dashboard provider {provider['name']}: no dashboards in {path}")
        for file in files:
            dashboard = json.load(open(file))
            uid = dashboard.get("uid") or os.path.splitext(os.path.basename(file))[0]
            dashboards[uid] = {"dashboard": dashboard, "folder": provider.get("folder", "")}
    return datasources, dashboards


DATASOURCES, DASHBOARDS = load()


class Api(BaseHTTPRequestHandler):
    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorised(self):
        expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return self.headers.get("authorization", "") == f"Basic {expected}"

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/api/health":
            return self.answer(200, {"database": "ok", "version": "stand-in"})
        if not self.authorised():
            return self.answer(401, {"message": "Unauthorized"})
        if url.path == "/api/datasources":
            return self.answer(200, DATASOURCES)
        if url.path == "/api/search":
            query = parse_qs(url.query).get("query", [""])[0].lower()
            hits = [
                {"uid": uid, "title": d["dashboard"].get("title", ""), "type": "dash-db",
                 "folderTitle": d["folder"]}
                for uid, d in DASHBOARDS.items()
                if query in d["dashboard"].get("title", "").lower()
            ]
            return self.answer(200, hits)
        if url.path.startswith("/api/dashboards/uid/"):
            found = DASHBOARDS.get(url.path.rsplit("/", 1)[1])
            if found:
                return self.answer(200, {"dashboard": found["dashboard"], "meta": {"folderTitle": found["folder"]}})
        return self.answer(404, {"message": "Not found"})

    def log_message(self, *_):
        pass


ThreadingHTTPServer(("0.0.0.0", 3000), Api).serve_forever()
