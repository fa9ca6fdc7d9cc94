"""Users and authentication: scrypt password hashes, the default-user rules, vhost access.

`hash_password` / `verify_password` implement the one stored format,
``scrypt$N$r$p$salt_b64$hash_b64`` (hashlib.scrypt, N=2**14, r=8, p=1, 16-byte salt, 32-byte hash).
`Authenticator` answers "may this login open this vhost?" for every protocol session; the rules
(README, Quick start per protocol):

- a client that sends no username is the default user when ``[server] allow_anonymous`` is on
  (RabbitMQ's MQTT and STOMP plugins do the same), so it gets exactly the default user's rights;
- ``guest``/``guest`` (RabbitMQ's default credentials, known to everyone) is accepted only from a
  loopback address, so a fresh broker that binds 0.0.0.0 is not open to the network. Any other
  password, or a default user with another name, is accepted from anywhere;
- a user with a ``vhosts`` list may open only those vhosts; the others may open every vhost.

Must not import: asyncio, protocols, storage, cluster; broker.config only for type checking
(broker.config imports this module to validate hashes while loading).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.config import Config

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
#: Bound on 128*N*r*p (scrypt's memory use) accepted from a stored hash, so a hand-edited hash
#: cannot make a login allocate gigabytes; it also keeps `maxmem` below hashlib's INT_MAX limit.
MAX_SCRYPT_MEMORY = 2**30

#: The credentials everyone knows; accepted only from loopback (RabbitMQ's `loopback_users`).
GUEST_USER = "guest"
GUEST_PASSWORD = b"guest"


@dataclass(frozen=True, slots=True)
class ScryptHash:
    """A parsed ``scrypt$N$r$p$salt_b64$hash_b64`` string."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _to_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else password


def parse_password_hash(text: str) -> ScryptHash:
    """Parse a stored hash; raise ValueError saying what is wrong (never echoing the text)."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError('expected "scrypt$N$r$p$salt$hash" (make one with `polybroker hash-password`)')
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        raise ValueError("N, r and p of the scrypt hash must be integers") from None
    if n < 2 or n & (n - 1) or r < 1 or p < 1:
        raise ValueError("scrypt N must be a power of 2 above 1, and r and p at least 1")
    if 128 * n * r * p > MAX_SCRYPT_MEMORY:
        raise ValueError(f"scrypt parameters need more than {MAX_SCRYPT_MEMORY >> 20} MiB per login")
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except binascii.Error:
        raise ValueError("the salt and hash of the scrypt hash must be base64") from None
    if not salt or len(digest) < 16:
        raise ValueError("the scrypt hash has an empty salt or a hash shorter than 16 bytes")
    return ScryptHash(n, r, p, salt, digest)


def _scrypt(password: bytes, params: ScryptHash | None, salt: bytes) -> bytes:
    n, r, p, dklen = (
        (SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
        if params is None
        else (params.n, params.r, params.p, len(params.digest))
    )
    # OpenSSL refuses to run when its working memory (~128*N*r*p) exceeds maxmem (default 32 MiB).
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=128 * n * r * p + (64 << 20)
    )


def hash_password(password: str | bytes) -> str:
    """Hash a password with a fresh random salt, in the stored format."""
    salt = os.urandom(SALT_BYTES)
    digest = _scrypt(_to_bytes(password), None, salt)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str | bytes, hashed: str) -> bool:
    """True if `password` matches `hashed`; False also when `hashed` is malformed.

    The comparison is constant-time (hmac.compare_digest), so the time taken does not tell an
    attacker how many leading bytes matched.
    """
    try:
        params = parse_password_hash(hashed)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(_to_bytes(password), params, params.salt), params.digest)


def is_loopback_address(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1); False for names."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class AuthFailure(enum.Enum):
    """Why a login was refused; sessions map it to their protocol's code (e.g. MQTT 5 0x86 for
    BAD_CREDENTIALS, 0x87 for the others; AMQP 403 ACCESS_REFUSED, 530 NOT_ALLOWED for vhosts)."""

    BAD_CREDENTIALS = "bad_credentials"
    ANONYMOUS_DISABLED = "anonymous_disabled"
    LOOPBACK_ONLY = "loopback_only"
    NO_SUCH_VHOST = "no_such_vhost"
    NO_VHOST_ACCESS = "no_vhost_access"


@dataclass(frozen=True, slots=True)
class User:
    """An authenticated principal. `vhosts` None means every vhost."""

    name: str
    tags: frozenset[str] = frozenset()
    vhosts: frozenset[str] | None = None

    def may_access(self, vhost: str) -> bool:
        return self.vhosts is None or vhost in self.vhosts


@dataclass(frozen=True, slots=True)
class AuthResult:
    ok: bool
    user: User | None = None
    reason: str = ""
    failure: AuthFailure | None = None
    anonymous: bool = False


@dataclass(frozen=True, slots=True)
class _Credential:
    user: User
    # Exactly one of the two is set: [users] entries and a hashed [default] pass carry a scrypt
    # hash; a plain [default] pass (the container-friendly POLYBROKER_DEFAULT_PASS) is compared as is.
    password_hash: str | None
    plain_password: bytes | None


_BAD_CREDENTIALS = AuthResult(
    False, reason="unknown user or bad password", failure=AuthFailure.BAD_CREDENTIALS
)
_ANONYMOUS_DISABLED = AuthResult(
    False, reason="anonymous login is disabled", failure=AuthFailure.ANONYMOUS_DISABLED
)
_LOOPBACK_ONLY = AuthResult(
    False, reason="guest may only connect from loopback", failure=AuthFailure.LOOPBACK_ONLY
)


class Authenticator:
    """Checks logins against the configured users; one per broker, shared by all sessions.

    Why a cache: scrypt is deliberately slow (~50-70 ms of CPU per check at N=2**14), and it runs
    on the caller's thread. After a restart or a network blip, 10,000 clients reconnecting with
    the same few credentials would cost 10,000 scrypts, i.e. minutes of CPU with the event loop
    stalled. So successful verifications are remembered in an LRU keyed by (user, HMAC of the
    password under a per-process random key): a hit costs one HMAC-SHA256. Only successes are
    cached, and each user has one password that verifies, so the cache holds at most about one
    entry per user; `cache_size` only bounds the pathological case. The key is an HMAC rather than
    a bare sha256 so that a memory dump does not hold unsalted password hashes. Failed attempts are
    never cached: each costs a full scrypt (a caller on an event loop may run `authenticate` in an
    executor; hashlib.scrypt releases the GIL).
    """

    def __init__(self, config: Config, *, cache_size: int = 10_000) -> None:
        self._allow_anonymous = config.server.allow_anonymous
        self._vhosts = frozenset(config.vhosts.names) | {"/"}
        self._credentials: dict[str, _Credential] = {}
        for entry in config.users:
            vhosts = None if entry.vhosts is None else frozenset(entry.vhosts)
            user = User(entry.name, frozenset(entry.tags), vhosts)
            self._credentials[entry.name] = _Credential(user, entry.password_hash, None)
        self._default: _Credential | None = None
        self._default_is_guest = False
        default = config.default
        if default.user:
            user = User(default.user, frozenset({"administrator"}), None)
            if default.password.startswith("scrypt$"):
                self._default = _Credential(user, default.password, None)
                self._default_is_guest = default.user == GUEST_USER and verify_password(
                    GUEST_PASSWORD, default.password
                )
            else:
                plain = default.password.encode("utf-8")
                self._default = _Credential(user, None, plain)
                self._default_is_guest = default.user == GUEST_USER and plain == GUEST_PASSWORD
            self._credentials[default.user] = self._default
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._cache_key = os.urandom(32)
        # Sessions may call from executor threads; OrderedDict's move/pop pairs are not atomic.
        self._lock = threading.Lock()

    def vhost_exists(self, name: str) -> bool:
        return name in self._vhosts

    def user(self, name: str) -> User | None:
        credential = self._credentials.get(name)
        return None if credential is None else credential.user

    def authenticate(
        self, username: str | None, password: str | bytes | None, *, is_loopback: bool, vhost: str
    ) -> AuthResult:
        """Decide one login. An empty or absent username is an anonymous login (the password is
        then ignored). Credentials are checked before the vhost, so a refused client learns
        nothing about which vhosts exist."""
        if not username:
            if not self._allow_anonymous or self._default is None:
                return _ANONYMOUS_DISABLED
            if self._default_is_guest and not is_loopback:
                return _LOOPBACK_ONLY
            return self._vhost_check(self._default.user, vhost, anonymous=True)
        credential = self._credentials.get(username)
        if credential is None:
            return _BAD_CREDENTIALS
        secret = b"" if password is None else _to_bytes(password)
        if not self._check_password(credential, secret):
            return _BAD_CREDENTIALS
        if username == GUEST_USER and secret == GUEST_PASSWORD and not is_loopback:
            return _LOOPBACK_ONLY
        return self._vhost_check(credential.user, vhost, anonymous=False)

    def _vhost_check(self, user: User, vhost: str, *, anonymous: bool) -> AuthResult:
        if vhost not in self._vhosts:
            return AuthResult(
                False, user, f"vhost {vhost} does not exist", AuthFailure.NO_SUCH_VHOST, anonymous
            )
        if not user.may_access(vhost):
            return AuthResult(
                False, user, f"no access to vhost {vhost}", AuthFailure.NO_VHOST_ACCESS, anonymous
            )
        return AuthResult(True, user, "", None, anonymous)

    def _check_password(self, credential: _Credential, secret: bytes) -> bool:
        if credential.plain_password is not None:
            return hmac.compare_digest(secret, credential.plain_password)
        assert credential.password_hash is not None
        key = (credential.user.name, hmac.digest(self._cache_key, secret, "sha256"))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True
        if not verify_password(secret, credential.password_hash):
            return False
        with self._lock:
            self._cache[key] = None
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return True
