"""broker.auth: scrypt hashes, the guest/loopback and anonymous rules, vhost access, the LRU cache."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

import broker.auth
from broker.auth import (
    Authenticator,
    AuthFailure,
    User,
    hash_password,
    is_loopback_address,
    parse_password_hash,
    verify_password,
)
from broker.config import Config, load_config


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {name: hash_password(f"{name}-pw") for name in ("alice", "bob", "guest")}


def authenticator(hashes: dict[str, str], env: dict[str, str] | None = None, **kwargs: int) -> Authenticator:
    base = {
        "POLYBROKER_VHOSTS_NAMES": "/,dev,prod",
        "POLYBROKER_USERS_ALICE": hashes["alice"],
        "POLYBROKER_USERS_BOB": hashes["bob"],
    }
    return Authenticator(load_config(env={**base, **(env or {})}), **kwargs)


# --- Hashing -------------------------------------------------------------------------------------


def test_hash_format_and_parameters() -> None:
    hashed = hash_password("secret")
    scheme, n, r, p, salt, digest = hashed.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == 32
    expected = hashlib.scrypt(b"secret", salt=base64.b64decode(salt), n=16384, r=8, p=1, dklen=32)
    assert base64.b64decode(digest) == expected
    assert hash_password("secret") != hashed  # a fresh salt each time


def test_verify_password() -> None:
    hashed = hash_password("pässword")
    assert verify_password("pässword", hashed)
    assert verify_password("pässword".encode(), hashed)  # MQTT passwords arrive as bytes
    assert not verify_password("password", hashed)
    assert not verify_password("", hashed)
    assert not verify_password("pässword", "scrypt$nonsense")
    assert not verify_password("pässword", "")


def test_hashes_with_other_parameters_verify() -> None:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=1024, r=4, p=2, dklen=24)
    hashed = f"scrypt$1024$4$2${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert parse_password_hash(hashed).n == 1024
    assert verify_password("pw", hashed) and not verify_password("px", hashed)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("bcrypt$16384$8$1$AAAA$AAAA", "expected"),
        ("scrypt$16384$8$1$AAAA", "expected"),
        ("scrypt$x$8$1$AAAA$AAAA", "must be integers"),
        ("scrypt$1000$8$1$AAAA$AAAA", "power of 2"),
        ("scrypt$16384$0$1$AAAA$AAAA", "power of 2"),
        ("scrypt$1048576$16$1$AAAA$AAAA", "MiB per login"),
        ("scrypt$16384$8$1$A!AA$AAAA", "base64"),
        ("scrypt$16384$8$1$$AAAAAAAAAAAAAAAAAAAAAA==", "empty salt"),
    ],
)
def test_malformed_hashes_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_password_hash(text)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("localhost", False),  # a peer address is never a name
        ("", False),
    ],
)
def test_is_loopback_address(host: str, expected: bool) -> None:
    assert is_loopback_address(host) is expected


# --- The default user and anonymous logins (README, Configuration) -------------------------------------------


def test_guest_guest_is_accepted_only_from_loopback() -> None:
    auth = Authenticator(Config())
    local = auth.authenticate("guest", "guest", is_loopback=True, vhost="/")
    assert local.ok and local.user == User("guest", frozenset({"administrator"}), None)
    remote = auth.authenticate("guest", "guest", is_loopback=False, vhost="/")
    assert not remote.ok
    assert remote.failure is AuthFailure.LOOPBACK_ONLY
    assert remote.reason == "guest may only connect from loopback"


def test_anonymous_is_the_default_user_so_the_loopback_rule_holds() -> None:
    auth = Authenticator(Config())
    for username in (None, ""):
        local = auth.authenticate(username, None, is_loopback=True, vhost="/")
        assert local.ok and local.anonymous and local.user is not None and local.user.name == "guest"
        remote = auth.authenticate(username, None, is_loopback=False, vhost="/")
        assert not remote.ok and remote.failure is AuthFailure.LOOPBACK_ONLY


def test_a_changed_default_user_is_accepted_from_anywhere() -> None:
    auth = Authenticator(
        load_config(env={"POLYBROKER_DEFAULT_USER": "admin", "POLYBROKER_DEFAULT_PASS": "s3cret"})
    )
    assert auth.authenticate("admin", "s3cret", is_loopback=False, vhost="/").ok
    assert not auth.authenticate("admin", "guest", is_loopback=True, vhost="/").ok
    assert not auth.authenticate("guest", "guest", is_loopback=True, vhost="/").ok  # no guest any more
    anonymous = auth.authenticate(None, None, is_loopback=False, vhost="/")
    assert anonymous.ok and anonymous.user is not None and anonymous.user.name == "admin"


def test_guest_with_a_changed_password_is_accepted_from_anywhere() -> None:
    auth = Authenticator(load_config(env={"POLYBROKER_DEFAULT_PASS": "not-guest"}))
    assert auth.authenticate("guest", "not-guest", is_loopback=False, vhost="/").ok
    assert auth.authenticate(None, None, is_loopback=False, vhost="/").ok


def test_a_hashed_default_password(hashes: dict[str, str]) -> None:
    auth = Authenticator(
        load_config(env={"POLYBROKER_DEFAULT_USER": "ops", "POLYBROKER_DEFAULT_PASS": hashes["bob"]})
    )
    assert auth.authenticate("ops", "bob-pw", is_loopback=False, vhost="/").ok
    assert not auth.authenticate("ops", hashes["bob"], is_loopback=False, vhost="/").ok
    # guest/guest stored as a hash is still guest/guest: loopback only, also for anonymous clients.
    guest = Authenticator(load_config(env={"POLYBROKER_DEFAULT_PASS": hash_password("guest")}))
    assert guest.authenticate("guest", "guest", is_loopback=True, vhost="/").ok
    assert (
        guest.authenticate("guest", "guest", is_loopback=False, vhost="/").failure
        is AuthFailure.LOOPBACK_ONLY
    )
    assert guest.authenticate(None, None, is_loopback=False, vhost="/").failure is AuthFailure.LOOPBACK_ONLY


def test_a_configured_guest_user_with_password_guest_is_loopback_only() -> None:
    config = load_config(
        env={"POLYBROKER_DEFAULT_USER": "", "POLYBROKER_USERS_GUEST": hash_password("guest")}
    )
    auth = Authenticator(config)
    assert auth.authenticate("guest", "guest", is_loopback=True, vhost="/").ok
    assert (
        auth.authenticate("guest", b"guest", is_loopback=False, vhost="/").failure
        is AuthFailure.LOOPBACK_ONLY
    )


def test_anonymous_refused_when_disabled_or_without_a_default_user(hashes: dict[str, str]) -> None:
    for env in ({"POLYBROKER_SERVER_ALLOW_ANONYMOUS": "false"}, {"POLYBROKER_DEFAULT_USER": ""}):
        result = authenticator(hashes, env).authenticate(None, None, is_loopback=True, vhost="/")
        assert not result.ok and result.failure is AuthFailure.ANONYMOUS_DISABLED
        assert result.reason == "anonymous login is disabled"


def test_disabling_anonymous_keeps_the_default_user_for_named_logins(hashes: dict[str, str]) -> None:
    auth = authenticator(hashes, {"POLYBROKER_SERVER_ALLOW_ANONYMOUS": "false"})
    assert auth.authenticate("guest", "guest", is_loopback=True, vhost="/").ok


def test_the_default_user_can_be_disabled(hashes: dict[str, str]) -> None:
    auth = authenticator(hashes, {"POLYBROKER_DEFAULT_USER": ""})
    assert auth.user("guest") is None
    assert (
        auth.authenticate("guest", "guest", is_loopback=True, vhost="/").failure
        is AuthFailure.BAD_CREDENTIALS
    )
    assert auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/").ok


# --- Configured users ----------------------------------------------------------------------------


def test_bad_password_and_unknown_user_get_the_same_answer(hashes: dict[str, str]) -> None:
    auth = authenticator(hashes)
    for username, password in (
        ("alice", "wrong"),
        ("alice", None),
        ("alice", ""),
        ("mallory", "x"),
        ("guest", "x"),
    ):
        result = auth.authenticate(username, password, is_loopback=True, vhost="/")
        assert not result.ok and result.user is None
        assert result.failure is AuthFailure.BAD_CREDENTIALS
        assert result.reason == "unknown user or bad password"


def test_users_with_a_vhost_restriction(tmp_path: Path, hashes: dict[str, str]) -> None:
    path = tmp_path / "polybroker.toml"
    path.write_text(
        '[vhosts]\nnames = ["dev", "prod"]\n'
        f'[users.alice]\npassword = "{hashes["alice"]}"\nvhosts = ["dev"]\ntags = ["monitoring"]\n'
        f'[users]\nbob = "{hashes["bob"]}"\n'
    )
    auth = Authenticator(load_config(path, env={}))
    dev = auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="dev")
    assert dev.ok and dev.user == User("alice", frozenset({"monitoring"}), frozenset({"dev"}))
    root = auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/")
    assert not root.ok and root.failure is AuthFailure.NO_VHOST_ACCESS
    assert root.reason == "no access to vhost /"
    assert root.user is not None and root.user.name == "alice"
    for vhost in ("/", "dev", "prod"):  # no list: every vhost
        assert auth.authenticate("bob", "bob-pw", is_loopback=False, vhost=vhost).ok


def test_a_vhost_that_does_not_exist(hashes: dict[str, str]) -> None:
    auth = authenticator(hashes)
    result = auth.authenticate("bob", "bob-pw", is_loopback=False, vhost="qa")
    assert not result.ok and result.failure is AuthFailure.NO_SUCH_VHOST
    assert result.reason == "vhost qa does not exist"
    # Credentials come first: a refused client learns nothing about which vhosts exist.
    wrong = auth.authenticate("bob", "nope", is_loopback=False, vhost="qa")
    assert wrong.failure is AuthFailure.BAD_CREDENTIALS


def test_vhost_exists(hashes: dict[str, str]) -> None:
    auth = authenticator(hashes)
    assert all(auth.vhost_exists(name) for name in ("/", "dev", "prod"))
    assert not auth.vhost_exists("qa") and not auth.vhost_exists("")
    assert Authenticator(Config()).vhost_exists("/")


# --- The verification cache ----------------------------------------------------------------------


@pytest.fixture
def scrypt_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real: Callable[[str | bytes, str], bool] = broker.auth.verify_password

    def counting(password: str | bytes, hashed: str) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(broker.auth, "verify_password", counting)
    return calls


def test_successful_verifications_are_cached(hashes: dict[str, str], scrypt_calls: list[str]) -> None:
    auth = authenticator(hashes)
    for _ in range(50):
        assert auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/").ok
        assert auth.authenticate("alice", b"alice-pw", is_loopback=False, vhost="/").ok
    assert scrypt_calls == [hashes["alice"]]


def test_a_cached_success_does_not_accept_another_password(
    hashes: dict[str, str], scrypt_calls: list[str]
) -> None:
    auth = authenticator(hashes)
    assert auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/").ok
    assert not auth.authenticate("alice", "bob-pw", is_loopback=False, vhost="/").ok
    assert not auth.authenticate("bob", "alice-pw", is_loopback=False, vhost="/").ok  # keyed by user too
    assert len(scrypt_calls) == 3


def test_failures_are_not_cached(hashes: dict[str, str], scrypt_calls: list[str]) -> None:
    auth = authenticator(hashes)
    for _ in range(3):
        assert not auth.authenticate("alice", "wrong", is_loopback=False, vhost="/").ok
    assert len(scrypt_calls) == 3


def test_the_cache_evicts_the_least_recently_used(hashes: dict[str, str], scrypt_calls: list[str]) -> None:
    auth = authenticator(hashes, cache_size=1)
    auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/")
    auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/")
    assert len(scrypt_calls) == 1
    auth.authenticate("bob", "bob-pw", is_loopback=False, vhost="/")  # evicts alice
    auth.authenticate("alice", "alice-pw", is_loopback=False, vhost="/")
    assert scrypt_calls == [hashes["alice"], hashes["bob"], hashes["alice"]]


def test_the_plain_default_password_needs_no_scrypt(scrypt_calls: list[str]) -> None:
    auth = Authenticator(Config())
    assert auth.authenticate("guest", "guest", is_loopback=True, vhost="/").ok
    assert not auth.authenticate("guest", "gues", is_loopback=True, vhost="/").ok
    assert scrypt_calls == []
