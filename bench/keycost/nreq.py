"""Send N chat requests one after another on one keep-alive connection: nreq.py PORT KEY N [stream]
(each must be a 200; with C{stream}, streamed chat requests, each read to its end)."""

import http.client
import sys

port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
stream = sys.argv[4:] == ["stream"]
body = b'{"model":"vllm/meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"hello"}]%s}' % (
    b',"stream":true' if stream else b"")
connection = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    connection.request("POST", "/v1/chat/completions", body,
                       {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    assert response.status == 200, (response.status, answer[:200])
    assert not stream or answer.endswith(b"data: [DONE]\n\n"), answer[-200:]
