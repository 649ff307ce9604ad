"""The admin API's model list, and ADMIN_ENDPOINTS_ENABLED."""

import json

import pytest_twisted

from tests.support import start_gateway

KEY = {"Authorization": "Bearer k1"}


@pytest_twisted.ensureDeferred
async def test_admin_models_name_each_provider_and_virtual_models(reactor, http, fake):
    virtual = [{"source": "llama", "target": "vllm/meta-llama/Llama-3.1-8B-Instruct"}]
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "VIRTUAL_MODELS": json.dumps(virtual)})
    try:
        assert (await http.get(gw.url + "/admin/api/v1/models")).code == 401
        response = await http.get(gw.url + "/admin/api/v1/models", headers=KEY)
        data = {m["id"]: m for m in json.loads(await response.content())["data"]}
        assert data["vllm/meta-llama/Llama-3.1-8B-Instruct"] == {
            "id": "vllm/meta-llama/Llama-3.1-8B-Instruct", "provider": "vllm", "provider_name": "vllm",
            "ready_replicas": 1}
        assert data["llama"]["provider"] == "virtual"
        assert data["llama"]["targets"] == [{"model": "vllm/meta-llama/Llama-3.1-8B-Instruct", "weight": 1.0}]
    finally:
        await gw.service.stopService()


@pytest_twisted.ensureDeferred
async def test_admin_endpoints_can_be_turned_off(reactor, http, fake):
    gw = await start_gateway(reactor, {"VLLM_BASE_URL": fake.base_url, "GOMODEL_MASTER_KEY": "k1",
                                       "ADMIN_ENDPOINTS_ENABLED": "false"})
    try:
        response = await http.get(gw.url + "/admin/api/v1/providers/status", headers=KEY)
        assert response.code == 404
        assert json.loads(await response.content())["error"]["code"] == "not_found"
    finally:
        await gw.service.stopService()
