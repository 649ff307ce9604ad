"""Send N chat requests on keep-alive connections: nreq.py PORT KEY N [stream]
(each must be a 200; with C{stream}, streamed requests, each read to its end). One connection,
one request after another; with C{CONC=K} in the environment, K connections at once (N/K each);
with C{WORKLOAD=responses}, Responses requests (C{/v1/responses}, stored as by default) instead; C{MODEL=paced},
the mock's paced model (25 ms between a stream's events: one upstream read each, as a model generates)."""

import http.client
import os
import sys
import threading

port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stream = sys.argv[4:] == ["stream"]
conc = int(os.environ.get("CONC", "1"))
responses = os.environ.get("WORKLOAD", "chat") == "responses"
path = "/v1/responses" if responses else "/v1/chat/completions"
model = os.environ.get("MODEL", "meta-llama/Llama-3.1-8B-Instruct").encode()
body = b'{"model":"vllm/%s",%s%s}' % (model,
    b'"input":"hello"' if responses else b'"messages":[{"role":"user","content":"hello"}]',
    b',"stream":true' if stream else b"")
# how a whole stream ends: chat's [DONE], or the Responses API's last event
END = b'"type":"response.completed"}\n\n' if responses else b"data: [DONE]\n\n"
failed = []


def send(count):
    connection = http.client.HTTPConnection("127.0.0.1", port)
    try:
        for _ in range(count):
            connection.request("POST", path, body,
                               {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
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
