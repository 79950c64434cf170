"""A stand-in for the Hugging Face Hub API on 127.0.0.1, for push tests (no network to the Hub exists here)."""

import base64
import http.server
import json
import threading


class HubStandIn:
    """The Hub endpoints that ``create_repo`` and ``upload_folder`` (huggingface_hub 2.x) call, on 127.0.0.1:
    repo creation, README.md metadata validation, preupload and commit.

    Every file is answered "regular" at preupload, so contents arrive base64-encoded in the commit. Other
    requests get a 404 and are recorded in :attr:`unexpected`. ``refuse`` names requests answered 403 instead, as
    the Hub answers a token without write access: ``"create"`` (repo creation) or ``"commit"``.
    """

    def __init__(self, refuse=()):
        self.refuse = set(refuse)
        self.created = []
        self.validated = []
        self.files = {}
        self.commits = []
        self.authorizations = set()  # of the API calls (the registry below is fetched without a token)
        self.unexpected = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                stand_in.authorizations.add(self.headers.get("authorization"))
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if ("create" in stand_in.refuse and parts == ["api", "repos", "create"]) or (
                    "commit" in stand_in.refuse and parts[:2] == ["api", "models"] and parts[-2] == "commit"
                ):
                    self.reply({"error": "You don't have the rights to write to this repo"}, status=403)
                elif parts == ["api", "repos", "create"]:
                    payload = json.loads(body)
                    stand_in.created.append(payload)
                    # Without an organization the Hub puts the repo under the token's user.
                    self.reply({"url": f"{stand_in.url}/{payload['organization'] or 'stand-in-user'}/{payload['name']}"})
                elif parts == ["api", "validate-yaml"]:
                    # upload_folder has the Hub check the metadata of a README.md before uploading it.
                    stand_in.validated.append(json.loads(body))
                    self.reply({"errors": [], "warnings": []})
                elif parts[:2] == ["api", "models"] and parts[-2] == "preupload":
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    self.reply({"files": modes})
                elif parts[:2] == ["api", "models"] and parts[-2] == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line]
                    stand_in.commits.append(lines[0]["value"])
                    for line in lines[1:]:
                        if line["key"] == "file" and line["value"]["encoding"] == "base64":
                            stand_in.files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        else:  # LFS pointers or deletions: never asked for by this stand-in's preupload answers
                            stand_in.unexpected.append(f"commit line {line['key']}")
                    repo = "/".join(parts[2:4])
                    self.reply({"commitUrl": f"{stand_in.url}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
                else:
                    self.not_found()

            def do_GET(self):
                if self.path == "/api/agent-harnesses":
                    # huggingface_hub fetches this registry (once a day) to describe its caller in the user agent.
                    self.reply({"standardEnvVars": [], "harnesses": {}})
                else:
                    self.not_found()

            def not_found(self):
                stand_in.unexpected.append(f"{self.command} {self.path}")
                self.reply({"error": "not in the stand-in"}, status=404)

            def reply(self, payload, status=200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
