"""Admission: every session request is decoded into one typed model and checked the same way.

    request ─▶ SessionSpec (bounds on every field; INVALID_ARGUMENT naming the field)
            ─▶ authenticate ─▶ authorize (verb, namespace, command policy)
            ─▶ resolve (the directory's effective view: lost instances excluded)

An observer (apiserver/observe.py) is admitted the same way: its spec names the
observed session (`rune-observe <id>`), its namespace and instance are the observed
session's, and it is authorized with verb `observe` (`Admission.admit_observer`).
Every refusal on the way is audited as `session.denied`. What follows (limits,
registration, audit of the session's life) is the session core's (apiserver/session.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rune.apiserver.config import LimitsConfig
from rune.apiserver.rbac import needs_tty_verb

from rune import bounds
from rune.errors import InvalidArgument, NotFound, PermissionDenied, RuneError
from rune.models import Argv, Env, Name, Seconds, TerminalSize, Workdir, first_problem
from rune.proto import exec_pb2 as pb

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0


class SessionSpec(BaseModel):
    """What a client asks to run, for any session kind, within the documented bounds."""

    model_config = ConfigDict(frozen=True)

    namespace: Name
    target: str
    argv: Argv
    env: Env = Field(default_factory=dict)
    workdir: Workdir = ""
    tty: bool = False
    width: TerminalSize = 0
    height: TerminalSize = 0
    timeout: Seconds = DEFAULT_TIMEOUT
    term: str = ""

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        # "*" names every service of the namespace (fan-out); resolution refuses it for one.
        return value if value == "*" else bounds.name(value, "target")

    @field_validator("term")
    @classmethod
    def _term(cls, value: str) -> str:
        return bounds.term(value)

    @property
    def interactive(self) -> bool:
        """A TTY, or an interactive shell or interpreter without one: needs exec-tty and
        is recorded."""
        return self.tty or needs_tty_verb(self.argv)


def _raw(fields: dict[str, Any]) -> SessionSpec:
    """The request as sent, unchecked: what a denial's audit event tells about it."""
    return SessionSpec.model_construct(**fields)


def decode(fields: dict[str, Any], limits: LimitsConfig, max_timeout: float) -> SessionSpec:
    """A checked SessionSpec, or InvalidArgument naming the field (raw spec attached)."""
    try:
        spec = SessionSpec.model_validate(fields)
        bounds.argv(spec.argv, limits.max_argc, limits.max_argv_bytes)
        bounds.env(spec.env, limits.max_env_bytes)
    except (ValidationError, bounds.OutOfBounds) as exc:
        error = InvalidArgument(f"invalid request: {first_problem(exc)}")
        error.spec = _raw(fields)
        raise error from None
    return spec.model_copy(update={"timeout": min(spec.timeout, max_timeout)})


def exec_fields(init: pb.ExecInit) -> dict[str, Any]:
    return {"namespace": init.namespace or "default", "target": init.target,
            "argv": list(init.command), "env": dict(init.env), "workdir": init.workdir,
            "tty": init.tty, "width": init.width, "height": init.height,
            "timeout": init.timeout_seconds or DEFAULT_TIMEOUT, "term": init.term}


def fanout_fields(request: pb.FanoutRequest) -> dict[str, Any]:
    return {"namespace": request.namespace or "default", "target": request.target,
            "argv": list(request.command), "env": dict(request.env),
            "workdir": request.workdir, "tty": False,
            "timeout": request.timeout_seconds or DEFAULT_TIMEOUT}


def observe_fields(session_id: str, observed: Any | None, timeout: float) -> dict[str, Any]:
    """The SessionSpec of an observer: argv names whom it watches, for listings and audit."""
    i = observed.instance if observed is not None else None
    return {"namespace": i.namespace if i else "default",
            "target": i.instance_id if i else "?", "argv": ["rune-observe", session_id],
            "timeout": timeout}


class Admission:
    """Authentication, authorization and resolution for every session kind, audited."""

    def __init__(self, auth: Any, authz: Any, directory: Any, limits: LimitsConfig,
                 max_timeout: float, oversight: Any) -> None:
        self.auth = auth
        self.authz = authz
        self.directory = directory
        self.limits = limits
        self.max_timeout = max_timeout
        self.oversight = oversight

    def authenticate(self, metadata: Any) -> Any:
        return self.auth.authenticate(metadata or ())

    async def read_init(self, context: Any, max_message: int) -> tuple[Any, Any, float]:
        """A bidi stream's first message, which must be an init within the size limit, with
        the caller's identity and when it came: (init, identity, monotonic time)."""
        # Read init before refusing a token: ending the call while the client still writes
        # its first message makes gRPC report an internal error instead of our status.
        first = await context.read()
        received = time.monotonic()
        identity = self.authenticate(context.invocation_metadata())
        if first is grpc.aio.EOF or first.WhichOneof("msg") != "init":
            raise InvalidArgument("the first message of a stream must be init")
        if first.ByteSize() > max_message:
            raise InvalidArgument("init message exceeds the maximum message size")
        return first.init, identity, received

    def admit(self, identity: Any, fields: dict[str, Any], fanout_id: str = "",
              verb: str = "") -> SessionSpec:
        """The checked, authorized spec; every refusal is audited as denied, then raised."""
        spec = _raw(fields)
        try:
            spec = decode(fields, self.limits, self.max_timeout)
            # An interactive shell without a TTY is as interactive as one with: same verb.
            # A kind with a verb of its own (a copy: cp-read / cp-write) gives it.
            verb = verb or ("exec-tty" if spec.interactive else "exec")
            try:
                self.authz.authorize(identity, verb, spec.namespace, spec.argv, env=spec.env)
            except PermissionDenied as exc:
                log.warning("denied: user=%r namespace=%s target=%s argv0=%r: %s",
                            identity.user, spec.namespace, spec.target, spec.argv[0], exc)
                raise
        except RuneError as exc:
            self.deny(identity, getattr(exc, "spec", spec), exc, fanout_id)
            raise
        return spec

    def admit_observer(self, identity: Any, session_id: str,
                       find: Any) -> tuple[SessionSpec, Any]:
        """An operator's request to watch a live session of this apiserver: the checked,
        authorized (verb `observe` in its namespace) spec and the observed record. An
        unknown session, or another observer, is NotFound; refusals are audited."""
        fields = observe_fields(session_id[:64], None, self.max_timeout)  # for a denial
        try:
            fields["argv"] = ["rune-observe", bounds.name(session_id, "session id")]
            observed = find(session_id)
            if observed is None or not observed.on_agent:
                raise NotFound(f"no active session {session_id} on this API server")
        except RuneError as exc:  # a malformed id (OutOfBounds) too
            self.deny(identity, _raw(fields), exc)
            raise
        return self.admit(identity, observe_fields(session_id, observed, self.max_timeout),
                          verb="observe"), observed

    def resolve(self, identity: Any, spec: SessionSpec) -> Any:
        try:
            return self.directory.resolve(spec.namespace, spec.target)
        except RuneError as exc:
            self.deny(identity, spec, exc)
            raise

    def deny(self, identity: Any, spec: SessionSpec, exc: RuneError,
             fanout_id: str = "") -> None:
        self.oversight.denied(identity, spec, exc, fanout_id=fanout_id)
