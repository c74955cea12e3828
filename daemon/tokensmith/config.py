"""Typed configuration: one YAML file, every field overridable from TOKENSMITH_* variables.

The full annotated format is in docs/config-schema.md. Models reject fields they do not know
(extra="forbid"); backends are a discriminated union on `type`; secrets are SecretStr.
"""

from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from tokensmith.configview import (AWS_TIMEOUT, ClientBehaviour, LeaderBehaviour, SettingsBehaviour,  # noqa: F401
                                   _check_port, _utf8, backend_types, check_endpoint_url, is_loopback_host)
from tokensmith.errors import ConfigError

ENV_PREFIX = "TOKENSMITH_"
CONFIG_ENV = "TOKENSMITH_CONFIG"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The daemon's own secrets: never handed to a hook, whatever pass_env asks.
DAEMON_SECRET_ENV = {"VAULT_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _shared_fields_set(self):
        # Which fields a client's config sets is the same for thousands of clients, and each copy
        # of that set costs up to 728 bytes. Shared as a frozenset: a frozen model never adds to it.
        names = frozenset(self.__pydantic_fields_set__)
        object.__setattr__(self, "__pydantic_fields_set__", _FIELD_SETS.setdefault(names, names))
        return self


# Equal frozen sub-configs are kept once: most clients share a refresh policy and a key map, and
# at thousands of clients every copy costs about a kilobyte of resident memory.
_SHARED: "weakref.WeakValueDictionary[Model, Model]" = weakref.WeakValueDictionary()
_FIELD_SETS: dict[frozenset, frozenset] = {}


def shared(model: Model) -> Model:
    return _SHARED.setdefault(model, model)


class KeyMap(Model):
    client_id: str = "client_id"
    client_secret: str = "client_secret"
    username: str = "username"
    password: str = "password"
    refresh_token: str = "refresh_token"
    private_key: str = "private_key"
    certificate: str = "certificate"
    proxy_username: str = "proxy_username"
    proxy_password: str = "proxy_password"


AUTH_STYLES = ("basic", "post", "json", "query", "client_secret_jwt", "private_key_jwt", "tls_client_auth",
               "jwt_bearer_file")


class VaultSourceConfig(Model):
    type: Literal["vault"]
    mount: str = "secret"
    path: str
    kv_version: Literal[1, 2] = 2
    keys: KeyMap = KeyMap()


class AwsSourceConfig(Model):
    type: Literal["aws"]
    secret_id: str
    keys: KeyMap = KeyMap()


class FileSourceConfig(Model):
    type: Literal["file"]
    path: Path
    keys: KeyMap = KeyMap()


class EnvSourceConfig(Model):
    type: Literal["env"]
    prefix: str = ""
    keys: KeyMap = KeyMap()


SourceConfig = Annotated[
    Union[VaultSourceConfig, AwsSourceConfig, FileSourceConfig, EnvSourceConfig],
    Field(discriminator="type"),
]


def _octal_mode(value: Any) -> int:
    if isinstance(value, int):
        mode = value
    else:
        text = str(value).strip()
        if not re.fullmatch(r"0?o?[0-7]{3,4}", text):
            raise ValueError("must be an octal file mode such as \"0600\"")
        mode = int(text.replace("o", ""), 8)
    if mode & 0o007:
        raise ValueError("token files must not be readable or writable by others (use 0600 or 0640)")
    if mode & 0o111:
        raise ValueError("token files must not be executable")
    return mode


class FileSinkConfig(Model):
    type: Literal["file"]
    path: Path
    format: Literal["raw", "json", "env"] = "raw"
    env_key: str = "ACCESS_TOKEN"
    mode: int = 0o600
    group: str | None = None

    _check_mode = field_validator("mode", mode="before")(_octal_mode)

    @field_validator("env_key")
    @classmethod
    def _shell_name(cls, name: str) -> str:
        if not ENV_NAME.fullmatch(name):
            raise ValueError("must be a shell variable name (letters, digits and '_', not starting with a digit)")
        return name

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError("must be an absolute path")
        return path


class VaultSinkConfig(Model):
    type: Literal["vault"]
    mount: str = "secret"
    path: str


class AwsSinkConfig(Model):
    type: Literal["aws"]
    secret_id: str
    kms_key_id: str | None = None


SinkConfig = Annotated[
    Union[FileSinkConfig, VaultSinkConfig, AwsSinkConfig],
    Field(discriminator="type"),
]


class SignalHookConfig(Model):
    type: Literal["signal"]
    pid_file: Path
    signal: str = "HUP"

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, name: str) -> str:
        import signal

        name = name.upper().removeprefix("SIG")
        if not hasattr(signal, "SIG" + name):
            raise ValueError(f"unknown signal {name!r}")
        return name


class CommandHookConfig(Model):
    type: Literal["command"]
    argv: list[str] = Field(min_length=1)
    timeout: float = Field(10.0, gt=0, le=300)
    pass_env: list[str] = []  # the daemon's variables the command also gets (see docs/config-schema.md)

    @field_validator("pass_env")
    @classmethod
    def _passable(cls, names: list[str]) -> list[str]:
        for name in names:
            if not ENV_NAME.fullmatch(name):
                raise ValueError(f"{ascii(name)} is not an environment variable name")
            if name in DAEMON_SECRET_ENV or name.startswith(ENV_PREFIX):
                raise ValueError(f"{name} is the daemon's own (a secret or a config override) and is never passed "
                                 "to a hook")
        return names


HookConfig = Annotated[Union[SignalHookConfig, CommandHookConfig], Field(discriminator="type")]


class RefreshPolicy(Model):
    strategy: Literal["refresh_token", "reissue"] = "refresh_token"
    at_fraction: float = Field(0.75, gt=0, lt=1)
    min_lead: float = Field(60.0, ge=0)
    jitter: float = Field(0.1, ge=0, lt=0.5)
    default_lifetime: float = Field(3600.0, gt=0)
    refresh_token_lifetime: float = Field(7 * 24 * 3600.0, gt=0)
    backoff_initial: float = Field(1.0, gt=0)
    backoff_max: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> "RefreshPolicy":
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self


class ClientConfig(ClientBehaviour, Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    issuer: str | None = None
    token_url: str | None = Field(None, validate_default=True)
    grant: Literal["client_credentials", "password", "refresh_token"] = "client_credentials"
    auth_style: Literal["basic", "post", "json", "query", "client_secret_jwt", "private_key_jwt",
                        "tls_client_auth", "jwt_bearer_file"] = "post"
    assertion_audience: str | None = None
    signing_alg: Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
                         "HS256", "HS384", "HS512"] | None = None
    key_id: str | None = None
    assertion_file: Path | None = None
    proxy: str | None = None
    scope: str | None = None
    audience: str | None = None
    extra_params: dict[str, str] = {}
    allow_insecure_http: bool = False
    ca_bundle: Path | None = None
    timeout: float = Field(10.0, gt=0, le=120)
    revocation_url: str | None = None
    introspection_url: str | None = None
    verify_url: str | None = None
    source: SourceConfig
    refresh: RefreshPolicy = RefreshPolicy()
    sinks: list[SinkConfig] = Field(min_length=1)
    hooks: list[HookConfig] = []

    _shared = field_validator("source", "refresh", mode="after")(shared)

    @field_validator("token_url", mode="before")
    @classmethod
    def _token_url_or_issuer(cls, value: Any, info) -> Any:
        if value is None and not info.data.get("issuer"):
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError("missing", "Field required (or set issuer to discover it)")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "ClientConfig":
        for field in ("token_url", "revocation_url", "introspection_url", "verify_url", "issuer"):
            url = getattr(self, field)
            if url is not None:
                try:
                    check_endpoint_url(url, self.allow_insecure_http)
                except ValueError as exc:
                    raise ValueError(f"{field} {exc}") from None
        texts = {"scope": self.scope, "audience": self.audience,
                 **{f"extra_params.{ascii(key)[1:-1]}": f"{key}{value}" for key, value in self.extra_params.items()}}
        for field, text in texts.items():
            if text is not None and not _utf8(text):
                raise ValueError(f"{field} must be UTF-8 text (it holds a lone surrogate or undecodable byte)")
        if self.proxy is not None and self.proxy.strip().lower() not in ("none", "direct"):
            from tokensmith.proxy import parse_proxy_url

            try:
                parse_proxy_url(self.proxy)
            except ValueError as exc:
                raise ValueError(f"proxy {exc}") from None
            if "@" in self.proxy:
                raise ValueError("proxy must not carry credentials in the URL; put proxy_username and "
                                 "proxy_password in the source")
        if self.auth_style == "jwt_bearer_file" and self.assertion_file is None:
            raise ValueError("auth_style jwt_bearer_file needs assertion_file")
        if self.auth_style == "client_secret_jwt" and self.signing_alg and not self.signing_alg.startswith("HS"):
            raise ValueError("auth_style client_secret_jwt signs with HS256, HS384 or HS512")
        if self.auth_style == "private_key_jwt" and self.signing_alg and self.signing_alg.startswith("HS"):
            raise ValueError("auth_style private_key_jwt signs with an asymmetric algorithm, not HS*")
        reserved = {"grant_type", "client_id", "client_secret", "username", "password", "refresh_token",
                    "client_assertion", "client_assertion_type"}
        clash = reserved & set(self.extra_params)
        if clash:
            raise ValueError(f"extra_params must not set {', '.join(sorted(clash))}; those come from the source")
        if self.strategy_needs_primary_grant and self.grant == "refresh_token":
            raise ValueError("refresh.strategy reissue needs a primary grant that can issue a new token "
                             "(client_credentials or password), not refresh_token")
        return self


class VaultAuthConfig(Model):
    method: Literal["token", "approle", "kubernetes", "cert"] = "token"
    token: SecretStr | None = None
    token_file: Path | None = None
    role_id: str | None = None
    secret_id: SecretStr | None = None
    secret_id_file: Path | None = None
    mount_point: str | None = None
    role: str | None = None
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _method_fields(self) -> "VaultAuthConfig":
        if self.method == "token" and not (self.token or self.token_file):
            raise ValueError("method token needs token or token_file")
        if self.method == "approle" and not (self.role_id and (self.secret_id or self.secret_id_file)):
            raise ValueError("method approle needs role_id and secret_id (or secret_id_file)")
        if self.method == "kubernetes" and not self.role:
            raise ValueError("method kubernetes needs role")
        if self.method == "cert" and not (self.cert_file and self.key_file):
            raise ValueError("method cert needs cert_file and key_file")
        return self


class VaultConfig(Model):
    address: str
    namespace: str | None = None
    ca_bundle: Path | None = None
    timeout: float = Field(10.0, gt=0, le=120)
    allow_insecure_http: bool = False
    auth: VaultAuthConfig

    @field_validator("address")
    @classmethod
    def _address(cls, url: str, info) -> str:
        return url.rstrip("/")

    @model_validator(mode="after")
    def _scheme(self) -> "VaultConfig":
        check_endpoint_url(self.address, self.allow_insecure_http)
        return self


class AwsConfig(Model):
    region: str | None = None
    endpoint_url: str | None = None
    timeout: float = Field(AWS_TIMEOUT, gt=0, le=120)

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_port(cls, url: str | None) -> str | None:
        if url is not None:
            _check_port(url)
        return url


class LogConfig(Model):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["plain", "json"] = "plain"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class HealthConfig(Model):
    enabled: bool = True
    listen: str = Field("127.0.0.1:9464", pattern=r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]*):\d{1,5}$")

    @field_validator("listen")
    @classmethod
    def _listen_port(cls, listen: str) -> str:
        if int(listen.rpartition(":")[2]) > 65535:  # 0 is fine here: any free port
            raise ValueError("port must be 0-65535")
        return listen


SHARED_STATE_WORKERS = 32  # scheduler.max_workers unless set, with a vault or dynamodb state backend


class SchedulerConfig(Model):
    max_workers: int = Field(8, ge=1, le=256)
    ready_timeout: float = Field(30.0, gt=0)


class LeaderConfig(LeaderBehaviour, Model):
    """The leader lease, used only with a shared state backend (docs/ha.md)."""
    lease_ttl: float = Field(15.0, ge=1, le=600)
    renew_every: float = Field(5.0, gt=0)
    identity: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$")

    @model_validator(mode="after")
    def _renew_before_ttl(self) -> "LeaderConfig":
        if self.renew_every * 2 > self.lease_ttl:
            raise ValueError("renew_every must be at most half of lease_ttl, so one failed renewal does not lose the lease")
        return self


class FileStateConfig(Model):
    type: Literal["file"] = "file"


class VaultStateConfig(Model):
    type: Literal["vault"]
    mount: str = Field("secret", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    prefix: str = Field("tokensmith", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class DynamoStateConfig(Model):
    type: Literal["dynamodb"]
    table: str = Field(pattern=r"^[A-Za-z0-9_.-]{3,255}$")


StateConfig = Annotated[
    Union[FileStateConfig, VaultStateConfig, DynamoStateConfig],
    Field(discriminator="type"),
]


def _default_runtime_dir() -> Path:
    from tokensmith.control import default_runtime_dir

    return Path(default_runtime_dir())


def _default_state_dir() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/tokensmith").split(":")[0])


class Settings(SettingsBehaviour, BaseModel):
    """The whole config. read_config_data merges the YAML file and TOKENSMITH_* variables before
    validation, because env values address list items by index or client name. That is why this
    is a plain model and not a pydantic-settings BaseSettings, whose env source cannot."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # not Model: cli.py model_copy(update=...)s it

    state_dir: Path = Field(default_factory=_default_state_dir)
    state: StateConfig = Field(default_factory=FileStateConfig)
    runtime_dir: Path = Field(default_factory=_default_runtime_dir)
    audit_log: Path | None = None
    control_socket_group: str | None = None
    control_operators: list[int] = []  # user names or uids in the file; uids once loaded
    log: LogConfig = LogConfig()
    health: HealthConfig = HealthConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    leader: LeaderConfig = LeaderConfig()
    vault: VaultConfig | None = None
    aws: AwsConfig | None = None
    clients: list[ClientConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shared_state_workers(cls, data: Any) -> Any:
        """On a shared state backend each refresh mostly waits on the store's network round trips,
        so more workers by default; a max_workers the config sets stays as set."""
        if not isinstance(data, dict):
            return data
        state, scheduler = data.get("state"), data.get("scheduler")
        kind = state.get("type") if isinstance(state, dict) else getattr(state, "type", None)
        if kind in ("vault", "dynamodb") and (scheduler is None or isinstance(scheduler, dict)) \
                and "max_workers" not in (scheduler or {}):
            data = {**data, "scheduler": {**(scheduler or {}), "max_workers": SHARED_STATE_WORKERS}}
        return data

    @field_validator("control_operators", mode="before")
    @classmethod
    def _operator_uids(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return value
        uids = []
        for entry in value:
            if isinstance(entry, int) and not isinstance(entry, bool) and entry >= 0:
                uids.append(entry)
            elif isinstance(entry, str) and entry.isascii() and entry.isdigit():
                uids.append(int(entry))
            elif isinstance(entry, str) and entry:
                import pwd

                try:
                    uids.append(pwd.getpwnam(entry).pw_uid)
                except (KeyError, ValueError):
                    raise ValueError(f"unknown user {entry!r}: name an existing user or give a uid") from None
            else:
                raise ValueError("each entry must be a user name or a uid")
        return uids

    @model_validator(mode="after")
    def _cross_field(self) -> "Settings":
        problems = cross_field_problems([(client.name, [str(sink.path) for sink in client.sinks
                                                        if isinstance(sink, FileSinkConfig)],
                                          "vault" in backend_types(client)) for client in self.clients],
                                        self.vault is not None)
        secret_env = {client.source.prefix + getattr(client.source.keys, key).upper()
                      for client in self.clients if isinstance(client.source, EnvSourceConfig)
                      for key in KeyMap.model_fields}
        for client in self.clients:
            for hook in client.hooks:
                passed = secret_env & set(getattr(hook, "pass_env", ()))
                if passed:
                    problems.append(f"client {client.name}: a hook's pass_env names {', '.join(sorted(passed))}, "
                                    "which an env credential source reads; credentials are never passed to a hook")
        if self.state.type == "vault" and self.vault is None:
            problems.append("state type vault needs the top-level vault section (address and auth)")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def cross_field_problems(clients: list[tuple[str, list[str], bool]], has_vault: bool) -> list[str]:
    """Checks across clients, every problem found: (name, file sink paths, uses Vault) per client, from
    the validated models or, when validation failed elsewhere, from the raw config data."""
    problems = []
    first: dict[str, int] = {}
    for index, (name, _, _) in enumerate(clients):
        if name in first:
            problems.append(f"clients[{first[name]}] and clients[{index}] are both named {name!r}; "
                            f"names must be unique")
        else:
            first[name] = index
    paths: dict[str, str] = {}
    for name, sink_paths, _ in clients:
        for path in sink_paths:
            if path in paths and paths[path] != name:
                problems.append(f"file sink {path} is written by both {paths[path]} and {name}")
            paths.setdefault(path, name)
    users = [name for name, _, uses_vault in clients if uses_vault]
    if users and not has_vault:
        problems.append(f"client(s) {', '.join(users)} use Vault but the top-level vault section is missing")
    return problems


def raw_cross_field_problems(data: Any) -> list[str]:
    """cross_field_problems on config data that did not validate (a field error elsewhere must not
    hide a duplicate name)."""
    if not isinstance(data, dict) or not isinstance(data.get("clients"), list):
        return []
    clients = []
    for item in data["clients"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            continue
        sinks = item.get("sinks") if isinstance(item.get("sinks"), list) else []
        paths = [str(Path(str(sink["path"]))) for sink in sinks
                 if isinstance(sink, dict) and sink.get("type") == "file" and sink.get("path")]
        types = {part.get("type") for part in [item.get("source"), *sinks] if isinstance(part, dict)}
        clients.append((item["name"], paths, "vault" in types))
    return cross_field_problems(clients, isinstance(data.get("vault"), dict))


def _parse_env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_path(tree: Any, path: list[str], value: Any, var: str, where: tuple = ()) -> tuple:
    """Set the value; returns where it went, as a pydantic error location (list indexes as ints)."""
    head, rest = path[0], path[1:]
    if isinstance(tree, list):
        if head.isdigit():
            index = int(head)
            if index >= len(tree):
                raise ConfigError(f"{var}: clients[{index}] does not exist in the config file")
        else:
            wanted = head.lower().replace("-", "_")
            names = [str(item.get("name", "")).lower().replace("-", "_") if isinstance(item, dict) else ""
                     for item in tree]
            if wanted not in names:
                raise ConfigError(f"{var}: no client named {head.lower()!r} in the config file")
            index = names.index(wanted)
        if not rest:
            tree[index] = value
            return where + (index,)
        if not isinstance(tree[index], dict):
            tree[index] = {}
        return _set_path(tree[index], rest, value, var, where + (index,))
    key = head.lower()
    if not rest:
        tree[key] = value
        return where + (key,)
    child = tree.get(key)
    if not isinstance(child, (dict, list)):
        child = tree[key] = {}
    return _set_path(child, rest, value, var, where + (key,))


def ignored_env(environ: dict[str, str]) -> list[str]:
    """TOKENSMITH_* variables that name no top-level config field (TOKENSMITH_CONFIG aside). They are
    left alone, as tools around tokensmith use the prefix too; check-config lists them."""
    return sorted(var for var in environ if var.startswith(ENV_PREFIX) and var != CONFIG_ENV
                  and var[len(ENV_PREFIX):].split("__")[0].lower() not in Settings.model_fields)


def apply_env_overrides(data: dict, environ: dict[str, str], origins: dict | None = None) -> dict:
    """origins, when given, collects {error location: variable} so errors can name the variable."""
    skip = set(ignored_env(environ))
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var == CONFIG_ENV or var in skip:
            continue
        path = [part for part in var[len(ENV_PREFIX):].split("__") if part]
        if path:
            where = _set_path(data, path, _parse_env_value(environ[var]), var)
            if origins is not None:
                origins[where] = var
    return data


def read_config_data(path: Path | None, environ: dict[str, str] | None = None, origins: dict | None = None) -> dict:
    environ = dict(os.environ if environ is None else environ)
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    data: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        try:
            # the C loader: a 5,000-client config parses in a fifth of the time and memory
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        except (yaml.YAMLError, RecursionError) as exc:  # a pathologically nested document overflows the parser
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path} is not valid YAML{where}") from None
        if len(text) > COMPACT_ABOVE:
            data = _compacted(data)
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return apply_env_overrides(data, environ, origins)


COMPACT_ABOVE = 64 * 1024  # bytes of config text (about 150 clients): below, the gain is not worth a gc pass


def _compacted(data: Any) -> Any:
    """The same data in fresh memory. The YAML parser's temporaries (a node and its marks per
    scalar) are interleaved with the values it returns; as long as those values live, the
    allocator cannot give the emptied pages back: about 7 KB of resident memory per client.
    A pickle round trip (exact for every type YAML yields, sharing kept) rebuilds the values
    after everything else is freed."""
    import gc
    import pickle

    try:
        blob = pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)
    except RecursionError:  # nested deeper than pickle goes: keep it as parsed (validation will refuse it)
        return data
    del data
    gc.collect()
    return pickle.loads(blob)


HINTS = {
    "missing": "add this field",
    "extra_forbidden": "unknown field: check its spelling against docs/config-schema.md",
    "union_tag_invalid": "set type to one of the listed backends",
    "union_tag_not_found": "add a type field naming the backend",
    "literal_error": "use one of the listed values",
    "string_pattern_mismatch": "use letters, digits, '.', '_' or '-'",
    "too_short": "add at least one entry",
}


def describe_errors(exc: ValidationError, data: Any, origins: dict | None = None) -> list[str]:
    """One line per problem: the field path (with client names), the message, a hint, and the
    TOKENSMITH_* variable that set the field. No input values."""
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = tuple(err["loc"])
        variable = next((var for where, var in (origins or {}).items() if loc[:len(where)] == where), None)
        parts: list[str] = []
        node = data
        for loc in err["loc"]:
            if isinstance(loc, int):
                label = f"[{loc}]"
                if isinstance(node, list) and loc < len(node) and isinstance(node[loc], dict) and node[loc].get("name"):
                    label = f"[{loc}]({node[loc]['name']})"
                parts.append(label)
                node = node[loc] if isinstance(node, list) and loc < len(node) else None
            else:
                if loc in ("vault", "aws", "file", "env", "signal", "command", "dynamodb") and parts \
                        and isinstance(node, dict) \
                        and node.get("type") == loc:
                    continue
                parts.append(("." if parts else "") + str(loc))
                node = node.get(loc) if isinstance(node, dict) else None
        where = "".join(parts)
        hint = HINTS.get(err["type"])
        for message in err["msg"].removeprefix("Value error, ").split("\n"):
            line = f"{where}: {message}" if where else message
            if variable:
                line += f" (set by {variable})"
            lines.append(line + (f" (hint: {hint})" if hint else ""))
    return lines


def load_settings(path: Path | str | None = None, environ: dict[str, str] | None = None) -> Settings:
    origins: dict = {}
    data = {str(key): value for key, value in read_config_data(Path(path) if path else None, environ,
                                                               origins).items()}
    try:
        return Settings(**data)
    except ValidationError as exc:
        problems = describe_errors(exc, data, origins)
        if not any(err["loc"] == () for err in exc.errors(include_input=False, include_url=False)):
            problems += raw_cross_field_problems(data)  # checks a field error stopped before they ran
        error = ConfigError(f"{len(problems)} problem(s) in config: " + "; ".join(problems))
        error.problems = problems
        raise error from None
