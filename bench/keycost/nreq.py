"""Send N chat requests on keep-alive connections: nreq.py PORT KEY N [stream]
(each must be a 200; with C{stream}, streamed requests, each read to its end). One connection,
one request after another; with C{CONC=K} in the environment, K connections at once (N/K each);
with C{WORKLOAD=responses}, Responses requests (C{/v1/responses}, stored as by default) instead; with
C{WORKLOAD=messages}, Anthropic Messages requests (C{/v1/messages}: the body and C{anthropic-version} header of
the protocol run's C{messages} workload, bench/harness/workloads.py, the key as C{x-api-key}, as Anthropic's
clients send it); C{MODEL=paced}, the mock's paced model (25 ms between a stream's events: one upstream read
each, as a model generates)."""

import http.client
import os
import sys
import threading

port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stream = sys.argv[4:] == ["stream"]
conc = int(os.environ.get("CONC", "1"))
workload = os.environ.get("WORKLOAD", "chat")
model = os.environ.get("MODEL", "meta-llama/Llama-3.1-8B-Instruct").encode()
# per workload: its path, its body's fields after the model, how a whole stream ends (chat's [DONE], the
# Responses API's or the Messages API's last event), and how the key is sent
path, fields, END, headers = {
    "chat": ("/v1/chat/completions", b'"messages":[{"role":"user","content":"hello"}]', b"data: [DONE]\n\n",
             {"Authorization": "Bearer " + key}),
    "responses": ("/v1/responses", b'"input":"hello"', b'"type":"response.completed"}\n\n',
                  {"Authorization": "Bearer " + key}),
    "messages": ("/v1/messages",
                 b'"max_tokens":20,"messages":[{"role":"user","content":"Say hello in twenty tokens."}]',
                 b'"type":"message_stop"}\n\n', {"x-api-key": key, "anthropic-version": "2023-06-01"}),
}[workload]
headers["Content-Type"] = "application/json"
body = b'{"model":"vllm/%s",%s%s}' % (model, fields, b',"stream":true' if stream else b"")
failed = []


def send(count):
    connection = http.client.HTTPConnection("127.0.0.1", port)
    try:
        for _ in range(count):
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            answer = response.read()
            assert response.status == 200, (response.status, answer[:200])
            assert not stream or answer.endswith(END), answer[-200:]
    except BaseException as e:
        failed.append(e)
        raise
    finally:
        connection.close()


threads = [threading.Thread(target=send, args=(n // conc + (i < n % conc),)) for i in range(conc)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
if failed:
    sys.exit("failed: %r" % (failed[0],))
