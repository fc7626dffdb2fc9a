"""Sends usage events to a Neruba gateway with the official CloudEvents Python SDK.

Run through scripts/cloudevents-sdk (which provides the SDK). Every request is built by the
SDK's own HTTP binding (structured and binary content modes; a batch is the SDK's structured
events in a JSON array, as the batch format defines); only the sending is ours (http.client,
which, unlike urllib, adds no Content-Type the SDK did not set, and needs nothing installed).
Prints one JSON line: {"sdk": major version, "results": [{"name", "mode", "status", "body"}]}
in the order sent.
"""

import http.client
import json
import sys
import urllib.parse
from datetime import datetime, timedelta, timezone

try:  # SDK 2.x
    from cloudevents.core.bindings.http import to_binary_event, to_structured_event
    from cloudevents.core.v1.event import CloudEvent

    SDK = "2"

    def make_event(attributes, data):
        return CloudEvent(attributes=attributes, data=data)

    def binary(event):
        message = to_binary_event(event)
        return message.headers, message.body

    def structured(event):
        message = to_structured_event(event)
        return message.headers, message.body

except ImportError:  # SDK 1.x
    from cloudevents.conversion import to_binary, to_structured
    from cloudevents.http import CloudEvent

    SDK = "1"

    def make_event(attributes, data):
        return CloudEvent(attributes, data)

    binary = to_binary
    structured = to_structured


def event(event_id, event_type, subject, data, content_type=None):
    attributes = {
        "id": event_id,
        "type": event_type,
        "source": "/neruba/tests/cloudevents-sdk",
        "time": datetime.now(timezone.utc) - timedelta(seconds=1),
    }
    if subject is not None:
        attributes["subject"] = subject
    if content_type is not None:
        attributes["datacontenttype"] = content_type
    return make_event(attributes, data)


def send(base, key, headers, body):
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        headers = dict(headers)
        headers["Authorization"] = f"Bearer {key}"
        connection.request("POST", "/v1/events", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def main():
    base, key = sys.argv[1].rstrip("/"), sys.argv[2]
    tokens = {"model": "large", "tokens": 1200, "status": "ok"}
    single = [
        ("structured", structured, event("sdk-s-1", "api.request", "cust-sdk", {"path": "/a"})),
        ("binary", binary, event("sdk-b-1", "llm.completion", "cust-sdk", tokens, "application/json")),
        ("binary-repeat", binary, event("sdk-b-1", "llm.completion", "cust-sdk", tokens, "application/json")),
        ("binary-no-content-type", binary, event("sdk-b-2", "api.request", "cüst €", {"path": "/b"})),
        (
            "binary-invalid-value",
            binary,
            event("sdk-b-3", "llm.completion", "cust-sdk", {"model": "m", "tokens": "a dozen", "status": "ok"}),
        ),
        ("binary-missing-subject", binary, event("sdk-b-4", "api.request", None, {"path": "/c"})),
    ]
    results = []
    for name, mode, ce in single:
        headers, body = mode(ce)
        status, answer = send(base, key, headers, body)
        results.append({"name": name, "mode": mode.__name__, "status": status, "body": answer})

    batch = [event(f"sdk-batch-{n}", "api.request", "cust-sdk", {"path": f"/{n}"}) for n in (1, 2)]
    bodies = [structured(ce)[1] for ce in batch]
    status, answer = send(
        base,
        key,
        {"Content-Type": "application/cloudevents-batch+json"},
        b"[" + b",".join(bodies) + b"]",
    )
    results.append({"name": "batch", "mode": "batch", "status": status, "body": answer})
    print(json.dumps({"sdk": SDK, "results": results}))


if __name__ == "__main__":
    main()
