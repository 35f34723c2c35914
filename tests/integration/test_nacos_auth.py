"""Nacos with auth on, as upstream Nacos 2.0.4 behaves to a client: the SDK logs in and registers;
anonymous and wrongly authenticated clients are refused, and our facade says which settings to fix;
the v1 HTTP open API works with a token (including the seed article's metadata update, PUT) and not
without; admins create users and grant permissions; tokens are signed with the configured key and
expire."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid

import pytest

import celeryconfig
from gpu_dispatch.registry import Registry, RegistryError
from tests.integration.nacos_http import call, login, token
from tests.support import wait_until

#: Seconds within which a change shows in a list (Nacos computes lists asynchronously).
PROPAGATION_DEADLINE = 10.0
SETTINGS = ("GPU_DISPATCH_NACOS_USERNAME", "GPU_DISPATCH_NACOS_PASSWORD")


@pytest.fixture
def nacos(servers):
    return servers[1]


@pytest.fixture
def admin_token(nacos) -> str:
    return token(nacos.address, celeryconfig.nacos_username, celeryconfig.nacos_password)


def _registry(service: str, username: str, password: str, made: list) -> Registry:
    registry = Registry.from_config(celeryconfig, nacos_service=service, nacos_username=username,
                                    nacos_password=password)
    made.append(registry)
    return registry


@pytest.fixture
def registries():
    made: list[Registry] = []
    yield made
    for registry in made:
        registry.close()


def test_login_answers_a_token_and_a_wrong_password_is_refused_with_403(nacos):
    reply = login(nacos.address, celeryconfig.nacos_username, celeryconfig.nacos_password)
    assert reply.status == 200, reply
    body = reply.json()
    assert body["tokenTtl"] == 18000 and body["globalAdmin"] is True  # nacos.core.auth.default.token.expire.seconds
    assert body["username"] == celeryconfig.nacos_username and body["accessToken"].count(".") == 2  # a JWT

    wrong = login(nacos.address, celeryconfig.nacos_username, "not-the-password")
    assert (wrong.status, wrong.body) == (403, "unknown user!")
    # The schema's default nacos/nacos admin is gone once another admin is configured.
    assert login(nacos.address, "nacos", "nacos").status == 403


def test_the_sdk_registers_with_the_configured_user(service_name, registries):
    owner = _registry(service_name, celeryconfig.nacos_username, celeryconfig.nacos_password, registries)
    owner.register("10.3.3.3", 8000, {"gpu_index": "0"})
    listed = wait_until(lambda: owner.list_instances(), PROPAGATION_DEADLINE, "the instance in a list")
    assert [(i.key, dict(i.metadata)) for i in listed] == [("10.3.3.3:8000", {"gpu_index": "0"})]


def test_anonymous_registration_is_refused_naming_the_settings(service_name, registries):
    anonymous = _registry(service_name, "", "", registries)
    with pytest.raises(RegistryError) as refused:
        anonymous.register("10.3.3.4", 8000, {"gpu_index": "0"})
    message = str(refused.value)
    assert "user not found!" in message and all(name in message for name in SETTINGS), message
    with pytest.raises(RegistryError, match="GPU_DISPATCH_NACOS_USERNAME"):
        anonymous.list_instances()


def test_a_wrong_password_is_refused_naming_the_settings_without_a_traceback(service_name, registries, caplog):
    with caplog.at_level(logging.WARNING):
        impostor = _registry(service_name, celeryconfig.nacos_username, "not-the-password", registries)
        with pytest.raises(RegistryError) as refused:
            impostor.register("10.3.3.5", 8000, {"gpu_index": "0"})
    message = str(refused.value)
    assert all(name in message for name in SETTINGS) and "not-the-password" not in message, message
    assert celeryconfig.nacos_password not in caplog.text
    # The SDK's unawaited first login is reported as one warning, not asyncio's traceback.
    assert "Task exception was never retrieved" not in caplog.text
    assert any("logging in as" in r.getMessage() and "GPU_DISPATCH_NACOS_PASSWORD" in r.getMessage()
               for r in caplog.records), caplog.text


def _hosts(nacos, service: str, token_: str | None) -> list[tuple[str, int, dict, bool]]:
    reply = call(nacos.address, "GET", "/v1/ns/instance/list", {"serviceName": service}, token=token_)
    assert reply.status == 200, reply
    return [(h["ip"], h["port"], h["metadata"], h["enabled"]) for h in reply.json()["hosts"]]


@pytest.mark.parametrize("ephemeral", ["true", "false"])
def test_v1_open_api_register_update_list_deregister_with_a_token(nacos, admin_token, service_name, ephemeral):
    instance = {"serviceName": service_name, "ip": "10.4.4.4", "port": "8000", "ephemeral": ephemeral}

    registered = call(nacos.address, "POST", "/v1/ns/instance", {**instance, "metadata": '{"gpu_util":"10"}'},
                      token=admin_token)
    assert (registered.status, registered.body) == (200, "ok")
    wait_until(lambda: _hosts(nacos, service_name, admin_token) == [("10.4.4.4", 8000, {"gpu_util": "10"}, True)],
               PROPAGATION_DEADLINE, "the registered instance in the list")

    # The seed article's metadata update: PUT /nacos/v1/ns/instance (a Raft write in Nacos 2.0.4).
    updated = call(nacos.address, "PUT", "/v1/ns/instance", {**instance, "metadata": '{"gpu_util":"99"}'},
                   token=admin_token)
    assert (updated.status, updated.body) == (200, "ok")
    wait_until(lambda: _hosts(nacos, service_name, admin_token) == [("10.4.4.4", 8000, {"gpu_util": "99"}, True)],
               PROPAGATION_DEADLINE, "the updated metadata in the list")

    removed = call(nacos.address, "DELETE", "/v1/ns/instance", instance, token=admin_token)
    assert (removed.status, removed.body) == (200, "ok")
    wait_until(lambda: _hosts(nacos, service_name, admin_token) == [], PROPAGATION_DEADLINE, "an empty list")


def test_v1_open_api_without_a_valid_token_is_refused(nacos, admin_token, service_name):
    instance = {"serviceName": service_name, "ip": "10.4.4.5", "port": "8000", "metadata": '{"gpu_util":"99"}'}
    for method in ("POST", "PUT", "DELETE"):
        reply = call(nacos.address, method, "/v1/ns/instance", instance)
        assert reply.status == 403 and reply.json()["message"] == "user not found!", (method, reply)
    reply = call(nacos.address, "PUT", "/v1/ns/instance", instance, token=admin_token[:-2] + "xx")
    assert reply.status == 403 and reply.json()["message"] == "token invalid!", reply
    assert call(nacos.address, "GET", "/v1/ns/instance/list", {"serviceName": service_name}).status == 403


def _jwt(key: bytes, subject: str, expires: float) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    header, claims = json.dumps({"alg": "HS256"}), json.dumps({"sub": subject, "exp": int(expires)})
    signing_input = f"{b64(header.encode())}.{b64(claims.encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def test_tokens_are_signed_with_the_configured_key_and_expire(nacos, service_name):
    key = base64.b64decode(json.loads(nacos.secrets_file.read_text())["token_secret_key"])
    assert len(key) >= 32  # nacos.core.auth.default.token.secret.key
    params = {"serviceName": service_name}
    fresh = _jwt(key, celeryconfig.nacos_username, time.time() + 60)
    assert call(nacos.address, "GET", "/v1/ns/instance/list", params, token=fresh).status == 200

    expired = call(nacos.address, "GET", "/v1/ns/instance/list", params,
                   token=_jwt(key, celeryconfig.nacos_username, time.time() - 1))
    assert expired.status == 403 and expired.json()["message"] == "token expired!", expired
    forged = call(nacos.address, "GET", "/v1/ns/instance/list", params,
                  token=_jwt(b"k" * 32, celeryconfig.nacos_username, time.time() + 60))
    assert forged.status == 403 and forged.json()["message"] == "token invalid!", forged


def test_an_admin_creates_a_user_who_registers_once_granted_a_permission(nacos, admin_token, service_name,
                                                                          registries):
    username, password = f"worker-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    created = call(nacos.address, "POST", "/v1/auth/users", token=admin_token,
                   form={"username": username, "password": password})
    assert created.status == 200 and created.json()["data"] == "create user ok!", created
    again = call(nacos.address, "POST", "/v1/auth/users", token=admin_token,
                 form={"username": username, "password": password})
    assert again.status == 400 and "already exist" in again.body, again
    user_token = token(nacos.address, username, password)
    assert login(nacos.address, username, password).json()["globalAdmin"] is False
    # Only admins manage users.
    assert call(nacos.address, "POST", "/v1/auth/users", token=user_token,
                form={"username": "x" + username, "password": "x"}).status == 403

    worker = _registry(service_name, username, password, registries)
    with pytest.raises(RegistryError, match="authorization failed!.*GPU_DISPATCH_NACOS_USERNAME"):
        worker.register("10.5.5.5", 8000, {"gpu_index": "0"})

    role = f"role-{username}"
    assert call(nacos.address, "POST", "/v1/auth/roles", token=admin_token,
                form={"role": role, "username": username}).status == 200
    assert call(nacos.address, "POST", "/v1/auth/permissions", token=admin_token,
                form={"role": role, "resource": "*:*:naming/*", "action": "rw"}).status == 200
    worker.register("10.5.5.5", 8000, {"gpu_index": "0"})
    wait_until(lambda: [i.key for i in worker.list_instances()] == ["10.5.5.5:8000"], PROPAGATION_DEADLINE,
               "the granted user's instance in a list")
