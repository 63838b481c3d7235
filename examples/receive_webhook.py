"""Be told when a job ends: a webhook receiver with the standard library, checking every signature.

    ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS=127.0.0.1/32 robustify serve      # let the server call this machine
    python examples/receive_webhook.py --model mdl_…

Listens on http://127.0.0.1:<port>/hooks, registers that URL as a webhook endpoint (its secret signs
every message), submits an evaluation job that names it, and prints each message the server POSTs
once its signature and timestamp check out (docs/webhooks.md), until the job's final one. A real
receiver is the `Receiver` class below behind your web server, at an https URL. Servers refuse
webhooks to loopback and private addresses unless the operator allows them
(ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS), hence the variable above. Needs only the SDK. Server:
ROBUSTIFY_URL / ROBUSTIFY_API_KEY, or --url / --api-key.
"""
from __future__ import annotations

import argparse
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from robustify import APIError, Client
from robustify.webhooks import WebhookVerificationError, verify

FINAL = ("job.succeeded", "job.failed", "job.cancelled")
# For smoke tests: a cheap evaluation of 50 test images.
QUICK: dict[str, Any] = {"evaluation": "quick", "n_examples": 50, "wpgd_steps": 5, "pgd_steps": 3,
                         "linf_attacks": ["pgd"], "audit": False}


class Receiver(BaseHTTPRequestHandler):
    """POST /hooks: verify, then answer 204 at once (slow work goes after the answer)."""

    secret: ClassVar[str] = ""                    # the endpoint's whsec_… secret, set before serving
    received: ClassVar[queue.Queue[dict[str, Any]]] = queue.Queue()
    seen: ClassVar[set[str]] = set()              # webhook-id: a retried message comes again with the same id

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            event = verify(self.secret, dict(self.headers), body)   # the raw body, before parsing it
        except WebhookVerificationError as exc:
            self.send_response(400)
            self.end_headers()
            print(f"refused a message: {exc}", flush=True)
            return
        self.send_response(204)
        self.end_headers()
        if self.headers["webhook-id"] not in self.seen:
            self.seen.add(self.headers["webhook-id"])
            self.received.put(event)

    def log_message(self, format: str, *args: Any) -> None:   # no access log on stderr
        return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a ready model's id (mdl_…)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    parser.add_argument("--host", default="127.0.0.1", help="the address the server's workers reach this machine at")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the final message")
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    parser.add_argument("--quick", action="store_true", help="a cheap evaluation: for smoke tests")
    args = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1" if args.host == "127.0.0.1" else "0.0.0.0", args.port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://{args.host}:{server.server_address[1]}/hooks"
    with Client(args.url, api_key=args.api_key) as client:
        try:
            endpoint = client.webhooks.create(url, events=["job.started", "job.succeeded", "job.failed",
                                                           "job.cancelled"], description="receive_webhook.py")
        except APIError as exc:
            hint = (" (start the server with ROBUSTIFY_WEBHOOK_ALLOW_NETWORKS=127.0.0.1/32)"
                    if exc.code == "webhook_target_forbidden" else "")
            raise SystemExit(f"the server refused {url}: {exc}{hint}") from None
        Receiver.secret = endpoint.secret or ""
        print(f"listening on {url} (endpoint {endpoint.id})", flush=True)
        try:
            job = client.jobs.create(type="evaluate", model_id=args.model, dataset=args.dataset,
                                     config=QUICK if args.quick else {}, webhook=url)
            print(f"job {job.id} {job.status}; waiting for its webhooks", flush=True)
            while True:
                try:
                    event = Receiver.received.get(timeout=args.timeout)
                except queue.Empty:
                    raise SystemExit(f"no final webhook within {args.timeout:g} s") from None
                data = event["data"]
                print(f"verified {event['type']}: job {data['id']} {data['status']}", flush=True)
                if event["type"] in FINAL and data["id"] == job.id:
                    break
            if event["type"] == "job.succeeded":
                outcome = client.jobs.get(job.id).outcome
                if outcome is not None and outcome.summary is not None:
                    print(f"W2 robust accuracy {outcome.summary.w2}")
        finally:
            client.webhooks.delete(endpoint.id)
            server.shutdown()


if __name__ == "__main__":
    main()
