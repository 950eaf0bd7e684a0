"""The SQS fake the suite runs (moto, patched by replaysafe.testing._moto_server) neither drops
nor re-delivers messages when requests race: otherwise the chaos checker would charge the fake's
losses to the code under test."""

from __future__ import annotations

import json
import subprocess
import sys

from .conftest import subprocess_env

RACE = r"""
import json, sys, threading, time
sys.setswitchinterval(1e-5)  # switch threads often: the unpatched race shows within 1,000 messages
from moto.sqs.models import sqs_backends
from replaysafe.testing._moto_server import patch_sqs
patch_sqs(); patch_sqs()  # idempotent
b = sqs_backends["123456789012"]["us-east-1"]
q = b.create_queue("race", VisibilityTimeout="30")
N = 600
got, stop = [], threading.Event()
def send(k):
    for i in range(k, N, 2):
        b.send_message("race", str(i))
def consume():
    while not stop.is_set():
        for m in b.receive_message("race", 10, 0, 30):
            b.delete_message("race", m.receipt_handle)
            got.append(m.body)
consumers = [threading.Thread(target=consume) for _ in range(3)]
senders = [threading.Thread(target=send, args=(k,)) for k in range(2)]
for t in consumers + senders: t.start()
for t in senders: t.join()
deadline = time.monotonic() + 60
while len(got) < N and time.monotonic() < deadline:
    time.sleep(0.05)
stop.set()
for t in consumers: t.join()
left = {m.body for m in q._messages}
print(json.dumps({"received": len(got), "distinct": len(set(got)),
                  "missing": N - len(set(got) | left)}))
"""


def test_patched_moto_loses_and_repeats_nothing_under_racing_requests() -> None:
    out = subprocess.run(
        [sys.executable, "-c", RACE], env=subprocess_env(), capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts == {"received": 600, "distinct": 600, "missing": 0}
