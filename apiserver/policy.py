"""Command policy: allowed and blocked command patterns, matched on the parsed argv.

A pattern is a command line split like a shell would (`rm -rf`, `git status`).

**Allowlists are the boundary** and match strictly:
- argv[0] is the pattern's command as a bare name (found on the instance's own PATH,
  which a caller under an allowlist cannot change), or an absolute path to it in one of
  the trusted command directories (`/usr/bin/ls` for `ls`; never `/tmp/x/ls` or `./ls`);
  a pattern that is an absolute path matches exactly that path;
- the pattern's other words are argv's next words, exactly and in order (a full argv
  prefix: `git status` allows `git status --short`, not `git -c x=y status`);
- the environment passes the layer's env policy: with `allowed_env`, only those names
  (a trailing `*` is a prefix); without it, anything but the names that change what a
  program loads or runs (PATH, LD_*, GIT_*, PYTHON*, PERL5*, BASH_ENV, ENV, …).

**Blocklists are advisory** and match loosely, erring on the side of refusing:
- argv[0] by basename and name family (`mkfs` covers `mkfs.ext4`; `/bin/rm` is `rm`);
- flags by meaning: short flags as a set (`-rf`, `-fr`, `-r -f`), per-command aliases
  (`rm -R` is `-r`) and long names with their unique GNU abbreviations (`--rec` is
  `--recursive` is `-r`), from FLAG_TABLE for the common destructive tools;
- other words as argv's leading positional words, in order;
- behind wrappers (WRAPPERS: `env`, `sudo`, `xargs`, `flock`, `setpriv`, `unshare`,
  `chroot`, `nsenter`, `runuser`, `strace`, `watch`, `script`, the dynamic loader, …)
  every tail of argv is a candidate, and so is every argument split like a shell would
  (`env -S 'rm -rf /x'`, `script -c '…'`, `flock L -c '…'`).
A blocklist cannot see inside a shell or an interpreter (`sh -c`, `python -c`,
`find -exec`, …): never allow those to a role whose blocklist matters.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

# Commands that run (part of) their arguments as a command line.
WRAPPERS = frozenset((
    "env", "nice", "nohup", "sudo", "doas", "su", "runuser", "command", "exec", "builtin",
    "setsid", "stdbuf", "ionice", "time", "timeout", "busybox", "toybox", "chrt", "taskset",
    "xargs", "flock", "setpriv", "unshare", "chroot", "nsenter", "strace", "ltrace", "watch",
    "script", "prlimit", "cgexec", "systemd-run", "firejail", "bwrap", "fakeroot",
    "faketime", "numactl", "parallel", "tini", "dumb-init", "catchsegv", "valgrind", "gdb",
    "perf", "torsocks", "proxychains", "proxychains4", "sg", "rlwrap", "unbuffer", "chpst",
    "setuidgid", "gosu", "su-exec", "start-stop-daemon", "daemonize", "eatmydata", "nocache",
    "trickle", "ssh", "sshpass", "entr", "at", "batch", "capsh", "sandbox", "flatpak-spawn",
    "pkexec", "daemon", "softlimit", "envdir", "envuidgid", "s6-setuidgid", "chronic",
))
# The dynamic loader runs the program named by its first argument (ld-linux-x86-64.so.2).
_LOADER = re.compile(r"ld(-linux|-musl)?([-_.][A-Za-z0-9_.-]+)?\.so(\.[0-9]+)*|ld\.so")

# Flag meanings of the common destructive tools: `short` maps a short flag to its meaning
# (default: itself); `long` maps every long option the tool has to a meaning (a short
# flag it equals, or the long name itself), so that unique abbreviations resolve as the
# tool's getopt_long would resolve them.
_RM_LONG = {"--force": "f", "--interactive": "--interactive", "--one-file-system":
            "--one-file-system", "--no-preserve-root": "--no-preserve-root",
            "--preserve-root": "--preserve-root", "--recursive": "r", "--dir": "d",
            "--verbose": "v", "--help": "--help", "--version": "--version"}
_CHOWN_LONG = {"--recursive": "R", "--changes": "c", "--silent": "f", "--quiet": "f",
               "--verbose": "v", "--reference": "--reference", "--dereference":
               "--dereference", "--no-dereference": "h", "--from": "--from",
               "--preserve-root": "--preserve-root", "--no-preserve-root":
               "--no-preserve-root", "--help": "--help", "--version": "--version"}
FLAG_TABLE: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "rm": ({"R": "r"}, _RM_LONG),
    "chmod": ({}, _CHOWN_LONG),
    "chown": ({}, _CHOWN_LONG),
    "chgrp": ({}, _CHOWN_LONG),
    "cp": ({"R": "r"}, {"--recursive": "r", "--force": "f", "--archive": "a",
                        "--remove-destination": "--remove-destination", "--link": "l",
                        "--symbolic-link": "s", "--verbose": "v", "--help": "--help"}),
    "mv": ({}, {"--force": "f", "--interactive": "i", "--no-clobber": "n",
                "--verbose": "v", "--help": "--help"}),
    "shred": ({}, {"--remove": "u", "--zero": "z", "--force": "f", "--iterations": "n",
                   "--exact": "x", "--size": "s", "--verbose": "v",
                   "--random-source": "--random-source", "--help": "--help"}),
    "truncate": ({}, {"--size": "s", "--no-create": "c", "--io-blocks": "o",
                      "--reference": "r", "--help": "--help"}),
    "wipefs": ({}, {"--all": "a", "--force": "f", "--backup": "b", "--no-act": "n",
                    "--offset": "o", "--types": "t", "--quiet": "q", "--help": "h"}),
    "userdel": ({}, {"--remove": "r", "--force": "f", "--root": "R", "--help": "h"}),
    "crontab": ({}, {}),
    "kill": ({}, {"--signal": "s", "--list": "l", "--table": "L"}),
    "pkill": ({}, {"--signal": "--signal", "--full": "f", "--exact": "x",
                   "--euid": "u", "--uid": "U", "--newest": "n", "--oldest": "o"}),
    "killall": ({}, {"--signal": "s", "--exact": "e", "--user": "u", "--regexp": "r",
                     "--interactive": "i", "--wait": "w"}),
    "git": ({}, {"--force": "f", "--force-with-lease": "--force-with-lease",
                 "--force-if-includes": "--force-if-includes", "--hard": "--hard",
                 "--soft": "--soft", "--mixed": "--mixed", "--delete": "d",
                 "--mirror": "--mirror", "--all": "--all", "--tags": "--tags",
                 "--prune": "--prune", "--dry-run": "n", "--quiet": "q",
                 "--verbose": "v"}),
    "iptables": ({}, {"--flush": "F", "--delete-chain": "X", "--delete": "D",
                      "--append": "A", "--insert": "I", "--policy": "P", "--table": "t"}),
}

# Environment names that change what a program loads or runs, refused under an allowlist
# unless the layer's allowed_env names them.
DANGEROUS_ENV = ("PATH", "LD_*", "GIT_*", "PYTHON*", "PERL5*", "PERLLIB", "BASH_ENV",
                 "ENV", "BASH_FUNC_*", "SHELLOPTS", "PS4", "IFS", "RUBYOPT", "RUBYLIB",
                 "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
                 "LUA_INIT*", "LUA_PATH*", "LUA_CPATH*", "TCLLIBPATH", "GCONV_PATH",
                 "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "NLSPATH", "MALLOC_*",
                 "GLIBC_TUNABLES", "EDITOR", "VISUAL", "PAGER", "SSH_*",
                 "LESSOPEN", "LESSCLOSE", "HOME", "XDG_CONFIG_HOME", "PHPRC", "PHP_INI*")
# Where a bare allowlisted name may also be given by its absolute path.
DEFAULT_COMMAND_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                        "/sbin", "/bin")
_MAX_NESTING = 4
_SHLEX_LIMIT = 16 * 1024  # bytes of quoted text split by shlex per request
# Candidates parsed in full per request: a legitimate command line has a handful; an argv
# built to make each of its tails a blocked command (`env rm rm rm …`) is refused instead
# of costing time quadratic in its length.
MAX_CANDIDATES = 8


def command_name(word: str) -> str:
    return os.path.basename(word)


def _family(name: str) -> str:
    """`mkfs.ext4` → `mkfs`: the name family a blocked pattern covers."""
    return name.split(".", 1)[0] if "." in name and not _LOADER.fullmatch(name) else name


def is_wrapper(word: str) -> bool:
    name = command_name(word)
    return name in WRAPPERS or _family(name) in WRAPPERS or bool(_LOADER.fullmatch(name))


def _long_meaning(command: str, option: str) -> str:
    """A long option's meaning for `command`: exact name, else its unique abbreviation."""
    longs = FLAG_TABLE.get(_family(command), ({}, {}))[1]
    name = option.split("=", 1)[0]
    if name in longs:
        return longs[name]
    matches = [full for full in longs if full.startswith(name)]
    if len(matches) == 1:
        return longs[matches[0]]
    return name


def _short_meanings(command: str, letters: str) -> set[str]:
    shorts = FLAG_TABLE.get(_family(command), ({}, {}))[0]
    return {shorts.get(c, c) for c in letters}


def parse_flags(command: str, args: Sequence[str]) -> tuple[set[str], list[str]]:
    """(flag meanings, positional words) of args, as `command` would read them."""
    flags: set[str] = set()
    words: list[str] = []
    options_done = False
    for arg in args:
        if options_done:
            words.append(arg)
        elif arg == "--":
            options_done = True
        elif arg.startswith("--"):
            flags.add(_long_meaning(command, arg))
        elif arg.startswith("-") and len(arg) > 1:
            flags |= _short_meanings(command, arg[1:])
        else:
            words.append(arg)
    return flags, words


@dataclass(frozen=True)
class Pattern:
    text: str
    command: str  # as written: a bare name or an absolute path
    args: tuple[str, ...]  # the words after it, as written (the allowlist's prefix)
    flags: frozenset[str]  # their flag meanings (the blocklist's)
    words: tuple[str, ...]  # their positional words (the blocklist's)

    @classmethod
    def parse(cls, text: str) -> Pattern:
        parts = shlex.split(text)
        if not parts:
            raise ValueError("empty command pattern")
        command = parts[0]
        if "/" in command and not command.startswith("/"):
            raise ValueError(f"command pattern {text!r}: a path must be absolute")
        flags, words = parse_flags(command_name(command), parts[1:])
        return cls(text, command, tuple(parts[1:]), frozenset(flags), tuple(words))

    def blocks(self, argv: Sequence[str]) -> bool:
        """Loose match for a blocklist: name family, flags by meaning, leading words."""
        if not argv:
            return False
        name = command_name(argv[0])
        wanted = command_name(self.command)
        if name != wanted and _family(name) != wanted:
            return False
        flags, words = parse_flags(name, argv[1:])
        return self.flags <= flags and tuple(words[:len(self.words)]) == self.words

    def allows(self, argv: Sequence[str], command_dirs: Sequence[str]) -> bool:
        """Strict match for an allowlist: the command itself and argv's exact prefix."""
        if not argv or not _same_command(self.command, argv[0], command_dirs):
            return False
        return tuple(argv[1:1 + len(self.args)]) == self.args


def _same_command(pattern: str, word: str, command_dirs: Sequence[str]) -> bool:
    if pattern.startswith("/"):
        return word.startswith("/") and posixpath.normpath(word) == posixpath.normpath(pattern)
    if "/" not in word:
        return word == pattern
    if not word.startswith("/"):
        return False  # ./ls, bin/ls: wherever the caller's directory says
    path = posixpath.normpath(word)
    return (posixpath.basename(path) == pattern
            and posixpath.dirname(path) in {posixpath.normpath(d) for d in command_dirs})


_NEEDS_SPLIT = re.compile(r"[\s'\"\\]")
_NEEDS_SHLEX = re.compile(r"['\"\\]")


def _split(text: str, budget: list[int]) -> list[str]:
    """Split like a shell; shlex (slow) only for quoted text, within a per-request budget."""
    if not _NEEDS_SHLEX.search(text):
        return text.split()
    if len(text) <= budget[0]:
        budget[0] -= len(text)
        try:
            return shlex.split(text)
        except ValueError:
            pass
    return text.split()


def _command_strings(arg: str) -> tuple[str, ...]:
    """What a wrapper's argument could be as a command line: the argument itself, the
    value of an attached short option (`-S'rm -rf'`), or of `--opt=value`."""
    if arg.startswith("--"):
        return (arg.split("=", 1)[1], arg) if "=" in arg else (arg,)
    if arg.startswith("-") and len(arg) > 2:
        return arg[2:], arg
    return (arg,)


Candidate = tuple[Sequence[str], int]  # (a command line, where the candidate starts in it)


def candidates(argv: Sequence[str], depth: int = 0,
               budget: list[int] | None = None) -> Iterator[Candidate]:
    """argv, and what it may run behind wrappers: every tail, every shell-split argument.

    Wrappers take options with values we do not model, so each tail is a candidate: a
    blocklist errs on the side of refusing. A candidate is (line, start) so that nothing
    is copied until its first word is worth matching: a long argv costs one pass."""
    yield argv, 0
    if depth >= _MAX_NESTING or not argv or not is_wrapper(argv[0]):
        return
    budget = [_SHLEX_LIMIT] if budget is None else budget
    for index in range(1, len(argv)):
        yield argv, index
    for arg in argv[1:]:
        for text in _command_strings(arg):
            if not _NEEDS_SPLIT.search(text):
                if text:
                    yield [text], 0
                continue
            inner = _split(text, budget)
            if inner:
                yield from candidates(inner, depth + 1, budget)


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass(frozen=True)
class CommandPolicy:
    """One layer of policy (global, a namespace or a role)."""

    allowed: tuple[Pattern, ...] = ()
    blocked: tuple[Pattern, ...] = ()
    allowed_env: tuple[str, ...] | None = None  # None: anything but DANGEROUS_ENV
    command_dirs: tuple[str, ...] = DEFAULT_COMMAND_DIRS

    @classmethod
    def build(cls, allowed: Sequence[str] | None, blocked: Sequence[str] | None,
              allowed_env: Sequence[str] | None = None,
              command_dirs: Sequence[str] | None = None) -> CommandPolicy:
        return cls(tuple(Pattern.parse(p) for p in allowed or ()),
                   tuple(Pattern.parse(p) for p in blocked or ()),
                   None if allowed_env is None else tuple(allowed_env),
                   tuple(command_dirs) if command_dirs else DEFAULT_COMMAND_DIRS)

    @property
    def empty(self) -> bool:
        return not self.allowed and not self.blocked

    def refusal(self, argv: Sequence[str], env: Mapping[str, str] | None = None
                ) -> str | None:
        """Why argv (with env) is refused by this layer, or None when it may run."""
        if self.blocked:
            wanted = {command_name(p.command) for p in self.blocked}
            parsed = 0
            for line, start in candidates(argv):
                head = command_name(line[start])
                if head not in wanted and _family(head) not in wanted:
                    continue
                parsed += 1
                if parsed > MAX_CANDIDATES:
                    return (f"command wraps more than {MAX_CANDIDATES} commands for the "
                            "blocklist to check")
                candidate = line[start:]
                for pattern in self.blocked:
                    if pattern.blocks(candidate):
                        return f'command matches blocked pattern "{pattern.text}"'
        if self.allowed:
            if not any(p.allows(argv, self.command_dirs) for p in self.allowed):
                return "command is not in the allowed commands"
            return self.env_refusal(env or {})
        return None

    def env_refusal(self, env: Mapping[str, str]) -> str | None:
        for name in sorted(env):
            if self.allowed_env is not None:
                if not _matches_any(name, self.allowed_env):
                    return f"environment variable {name} is not in the allowed env"
            elif _matches_any(name, DANGEROUS_ENV):
                return (f"environment variable {name} may not be set under an allowlist "
                        "(list it in allowed_env to permit it)")
        return None
