"""Docker runner: containers as instances (adopted by label or run from config), exec in them.

The docker SDK is synchronous: its calls (listing, creating, events) run on this runner's
own thread pool, and the engine's event stream is read on one thread and handed to the
event loop, so the loop never blocks and the registry follows a container within moments
of a change. Execs, on every session's setup and data path, skip the SDK: engine_api.py
speaks to the engine's socket from the loop itself, and an exec on this host goes to the
container's runc without the engine in its data path (runc_exec.py): every non-TTY one,
and TTY ones where the engine could not size the terminal at create either (API < 1.42).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from weakref import WeakValueDictionary

import docker
from docker.errors import DockerException
from docker.errors import NotFound as DockerNotFound
from rune.agent.config import AgentConfig, DockerService
from rune.agent.registry import Registry
from rune.agent.runners.docker_exec import DockerExecution
from rune.agent.runners.engine_api import EngineAPI, EngineError, engine_url
from rune.agent.runners.engine_stream import start_exec
from rune.agent.runners.process import PipeExecution, PtyExecution
from rune.agent.runners.runc_exec import RuncExec

from rune.errors import NotFound, NotRunning, Unavailable
from rune.models import INSTANCE_MARK, ExecOpen, InstanceInfo
from rune.subjects import check_token

log = logging.getLogger(__name__)

NAMESPACE_LABEL = "rune.namespace"
SERVICE_LABEL = "rune.service"
INSTANCE_LABEL = "rune.instance"
AGENT_LABEL = "rune.agent"
EVENTS = ("start", "die", "destroy", "pause", "unpause", "exec_die")
STATES = {"running": "running", "paused": "stopped", "restarting": "restarting"}
MAX_BACKOFF = 10.0
DIED_KEPT = 1024


def derived_instance_id(service: str, container_name: str) -> str:
    """An id for a container without rune.instance: the service, the mark, its name."""
    return f"{service}{INSTANCE_MARK}{re.sub(r'[^A-Za-z0-9_-]', '-', container_name)}"


def managed_instance_id(service: str, agent_id: str, index: int) -> str:
    return f"{service}{INSTANCE_MARK}{agent_id}-{index}"


def engine_client(base_url: str | None, pool: int) -> docker.APIClient:
    """A low-level client for base_url, or as DOCKER_HOST (else the local socket) says."""
    if base_url:
        return docker.APIClient(base_url=base_url, version="auto", max_pool_size=pool)
    return docker.APIClient(version="auto", max_pool_size=pool,
                            **docker.utils.kwargs_from_env())


class DockerRunner:
    name = "docker"

    def __init__(self, config: AgentConfig, registry: Registry,
                 count_start: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._count_start = count_start or (lambda route: None)  # counts each exec's route
        self.settings = config.docker
        self.registry = registry
        self._pool = ThreadPoolExecutor(self.settings.threads, thread_name_prefix="docker")
        self.client: docker.APIClient | None = None
        self.api: EngineAPI | None = None  # exec calls, on the event loop
        self.containers: dict[str, str] = {}  # registry key → container id
        self._infos: dict[str, InstanceInfo] = {}  # container id → what was published
        self._managed: dict[str, str] = {}  # container id → registry key, run from config
        self._execs: WeakValueDictionary[str, DockerExecution] = WeakValueDictionary()
        self._died: dict[str, int] = {}  # exec id → exit code, for execs not yet registered
        self._events: asyncio.Queue[dict | None] = asyncio.Queue()
        self._stream: object | None = None
        self._follower: asyncio.Task | None = None
        self._stopping = False
        self._runc: RuncExec | None = None  # the route past the engine (runc_exec.py)

    async def _call(self, fn: object, *args: object, **kwargs: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # --- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self.client = await self._call(engine_client, self.settings.base_url,
                                           self.settings.threads + 2)
            await self._call(self.client.ping)
            self.api = EngineAPI(engine_url(self.settings.base_url))
            await self.api.negotiate()
        except (DockerException, OSError, EngineError) as exc:
            raise ConnectionError(f"docker engine not reachable: {exc}") from exc
        if self.settings.direct_exec:
            self._runc = await self._runc_route()
        await self._open_events()
        await self._adopt_running()
        for service in self.settings.services:
            for index in range(service.replicas):
                await self._run_managed(service, index)
        self._follower = asyncio.create_task(self._follow())

    async def _runc_route(self) -> RuncExec | None:
        """The engine's own runc binary (its `Runtimes` in `docker info`), where usable."""
        try:
            info = await self._call(self.client.info)
        except DockerException as exc:
            log.info("containers' execs go through the engine: %s", exc)
            return None
        runtime = (info.get("Runtimes") or {}).get("runc") or {}
        route = RuncExec(self.settings.runc_root, runtime.get("path") or "runc",
                         parked=self.settings.parked_starts,
                         parked_idle=self.settings.parked_idle,
                         count_start=self._count_start)
        return route if route.start() else None

    async def stop(self) -> None:
        self._stopping = True
        if self._follower:
            self._follower.cancel()
        self._close_events()
        managed = list(self._managed)
        await asyncio.gather(*(self._remove_managed(cid) for cid in managed))
        for cid, info in list(self._infos.items()):
            if cid not in managed:  # adopted: the agent no longer vouches for them
                await self.registry.remove(info)
                self._infos.pop(cid, None)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.api is not None:
            self.api.close()
        if self._runc is not None:
            self._runc.stop()

    # --- the engine's event stream ----------------------------------------------------
    def _filters(self) -> dict:
        labels = [NAMESPACE_LABEL, SERVICE_LABEL,
                  *(f"{k}={v}" for k, v in self.settings.match_labels.items())]
        return {"label": labels}

    async def _open_events(self) -> None:
        """Opens the stream before listing containers, so no change falls between the two."""
        filters = {**self._filters(), "type": "container", "event": list(EVENTS)}
        events_client = await self._call(engine_client, self.settings.base_url, 1)
        self._stream = await self._call(events_client.events, decode=True, filters=filters)
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_events, args=(self._stream, loop),
                         name="docker-events", daemon=True).start()

    def _read_events(self, stream: object, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for event in stream:
                loop.call_soon_threadsafe(self._events.put_nowait, event)
        except Exception as exc:
            if not self._stopping:
                log.warning("docker event stream ended: %s", exc)
        finally:
            try:
                loop.call_soon_threadsafe(self._events.put_nowait, None)
            except RuntimeError:
                pass  # the loop is closed: the agent has stopped

    def _close_events(self) -> None:
        if self._stream is not None:
            try:
                self._stream.close()
            except Exception:
                pass
            self._stream = None

    async def _follow(self) -> None:
        """Applies events; when the stream breaks (engine restart), reopens and re-lists."""
        backoff = 0.1
        while not self._stopping:
            event = await self._events.get()
            if event is not None:
                try:
                    await self._apply(event)
                except Exception:
                    log.exception("docker event %s not applied", event.get("Action"))
                backoff = 0.1
                continue
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                try:
                    await self._open_events()
                    await self._adopt_running(forget_missing=True)
                    break
                except (DockerException, OSError) as exc:
                    log.warning("docker engine unreachable: %s", exc)

    async def _apply(self, event: dict) -> None:
        action = event.get("Action", "")
        attributes = event.get("Actor", {}).get("Attributes", {})
        cid = event.get("Actor", {}).get("ID") or event.get("id", "")
        if action == "exec_die":
            exec_id, code = attributes.get("execID", ""), int(attributes.get("exitCode", 0))
            execution = self._execs.get(exec_id)
            if execution is not None:
                execution.exec_died(code)
            else:
                self._died[exec_id] = code
                while len(self._died) > DIED_KEPT:
                    self._died.pop(next(iter(self._died)))
            return
        if action == "start":
            await self._adopt(cid, attributes, attributes.get("name", cid[:12]),
                              attributes.get("image", ""), "running")
        elif action in ("die", "pause", "unpause"):
            state = {"die": "exited", "pause": "stopped", "unpause": "running"}[action]
            await self._set_state(cid, state)
        elif action == "destroy":
            info = self._infos.pop(cid, None)
            if info is not None and self.containers.get(info.key) == cid:
                self.containers.pop(info.key, None)
                await self.registry.remove(info)

    # --- instances --------------------------------------------------------------------
    async def _adopt_running(self, forget_missing: bool = False) -> None:
        found = await self._call(self.client.containers, filters=self._filters())
        seen = set()
        for item in found:
            seen.add(item["Id"])
            name = (item.get("Names") or [item["Id"][:12]])[0].lstrip("/")
            await self._adopt(item["Id"], item.get("Labels") or {}, name, item.get("Image", ""),
                              STATES.get(item.get("State", ""), "exited"))
        if forget_missing:
            for cid in set(self._infos) - seen:
                await self._set_state(cid, "exited")

    async def _adopt(self, cid: str, labels: dict, name: str, image: str, state: str) -> None:
        if labels.get(AGENT_LABEL, self.config.agent_id) != self.config.agent_id:
            return  # run by another agent on this engine
        try:
            namespace = check_token(labels.get(NAMESPACE_LABEL, ""), "namespace")
            service = check_token(labels.get(SERVICE_LABEL, ""), "service")
            instance = labels.get(INSTANCE_LABEL) or derived_instance_id(service, name)
            check_token(instance, "instance")
            if INSTANCE_MARK not in instance:
                raise ValueError(f"{INSTANCE_LABEL} {instance!r} must contain {INSTANCE_MARK!r}")
        except ValueError as exc:
            log.warning("container %s not adopted: %s", name, exc)
            return
        info = InstanceInfo(
            namespace=namespace, service=service, instance_id=instance, state=state,
            agent=self.config.agent_id, host=self.config.host, runner="docker",
            labels={"container": name, "image": image},
        )
        previous = self._infos.get(cid)
        if previous is not None and previous.key != info.key:
            await self.registry.remove(previous)
        self._infos[cid] = info
        self.containers[info.key] = cid
        await self.registry.publish(info)

    async def _set_state(self, cid: str, state: str) -> None:
        info = self._infos.get(cid)
        if info is None or self.containers.get(info.key) != cid or info.state == state:
            return
        info = info.model_copy(update={"state": state, "updated": time.time()})
        self._infos[cid] = info
        await self.registry.publish(info)

    # --- services run from the agent's config ------------------------------------------
    async def _run_managed(self, service: DockerService, index: int) -> None:
        agent_id = self.config.agent_id
        name = f"rune-{agent_id}-{service.name}-{index}"
        labels = {**service.labels, **self.settings.match_labels,
                  NAMESPACE_LABEL: service.namespace, SERVICE_LABEL: service.name,
                  INSTANCE_LABEL: managed_instance_id(service.name, agent_id, index),
                  AGENT_LABEL: agent_id}
        env = {**service.env, "RUNE_NAMESPACE": service.namespace,
               "RUNE_SERVICE": service.name, "RUNE_INSTANCE": labels[INSTANCE_LABEL],
               "RUNE_AGENT": agent_id}
        try:
            await self._call(self.client.remove_container, name, force=True)  # a stale one
        except DockerNotFound:
            pass
        host_config = self.client.create_host_config(
            restart_policy={"Name": "unless-stopped"}, network_mode=service.network_mode,
            init=False)
        created = await self._call(
            self.client.create_container, service.image, service.command, name=name,
            labels=labels, environment=env, working_dir=service.workdir, user=service.user,
            host_config=host_config)
        cid = created["Id"]
        self._managed[cid] = f"{service.namespace}.{labels[INSTANCE_LABEL]}"
        await self._call(self.client.start, cid)
        await self._adopt(cid, labels, name, service.image, "running")

    async def _remove_managed(self, cid: str) -> None:
        info = self._infos.get(cid)
        try:
            await self._call(self.client.remove_container, cid, force=True)
        except DockerException as exc:
            log.warning("cannot remove container %s: %s", cid[:12], exc)
        self._managed.pop(cid, None)
        if info is not None:
            await self._set_state(cid, "stopped")

    # --- exec -------------------------------------------------------------------------
    async def exec(self, instance: InstanceInfo,
                   request: ExecOpen) -> DockerExecution | PipeExecution | PtyExecution:
        cid = self.containers.get(instance.key)
        if cid is None:
            raise NotFound(f"instance {instance.instance_id} is not a container of this agent")
        if self._runc_takes(request) and self._runc.runs(cid):
            info = self._infos.get(cid)
            if info is not None and info.state != "running":
                raise NotRunning(f"instance {instance.instance_id} is not running: "
                                 f"it is {info.state}")
            return await self._runc.exec(cid, request)
        began = time.perf_counter()
        try:
            exec_id = await self.api.exec_create(cid, self._exec_spec(request))
            created = time.perf_counter()
            stream = await start_exec(self.api, exec_id, request.tty)
        except EngineError as exc:
            if exc.status in (404, 409):
                raise NotRunning(f"instance {instance.instance_id} is not running: "
                                 f"{exc.explanation}") from exc
            raise Unavailable(f"docker engine refused the exec: {exc.explanation}") from exc
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"docker engine not reachable: {exc}") from exc
        started = time.perf_counter()
        self._count_start("engine")
        execution = DockerExecution(exec_id, stream, self.api)
        self._execs[exec_id] = execution
        if exec_id in self._died:  # a quick command can end before its exec start returns
            execution.exec_died(self._died.pop(exec_id))
        if request.tty and not self.api.console_size_at_create:
            # Before API 1.42 (Engine 23) the size can only follow the start, as with
            # `docker exec -t`; done before the session starts, so that the first keystroke
            # meets the right size (the command's very first output may still see 80x24).
            await execution.initial_size(request.width, request.height)
        log.debug("exec %s: create %.1f ms, start %.1f ms, size %.1f ms", exec_id[:12],
                  1000 * (created - began), 1000 * (started - created),
                  1000 * (time.perf_counter() - started))
        return execution

    def _runc_takes(self, request: ExecOpen) -> bool:
        """runc's route, where it is the same exec: without a TTY always; with one where
        the engine sizes the terminal after the start too (before API 1.42): the agent
        sizes it as it arrives, where an engine that takes ConsoleSize would have it
        sized from the first byte."""
        return self._runc is not None and (not request.tty
                                           or not self.api.console_size_at_create)

    def _exec_spec(self, request: ExecOpen) -> dict:
        env = dict(request.env)
        if request.tty:
            env.setdefault("TERM", "xterm-256color")
        # request.user is who asked (for audit), not an account in the container: the
        # command runs as the container's own user, as with `docker exec` without -u.
        spec = {"AttachStdin": True, "AttachStdout": True, "AttachStderr": True,
                "Tty": request.tty, "Cmd": request.argv,
                "Env": [f"{key}={value}" for key, value in env.items()]}
        if request.workdir:
            spec["WorkingDir"] = request.workdir
        if request.tty and self.api.console_size_at_create and request.width > 0 \
                and request.height > 0:
            spec["ConsoleSize"] = [request.height, request.width]
        return spec
