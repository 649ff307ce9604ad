"""Send N chat requests one after another on one keep-alive connection: nreq.py PORT KEY N (each must be a 200)."""

import http.client
import sys

port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = b'{"model":"vllm/meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"hello"}]}'
connection = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    connection.request("POST", "/v1/chat/completions", body,
                       {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    response = connection.getresponse()
    answer = response.read()
    assert response.status == 200, (response.status, answer[:200])
