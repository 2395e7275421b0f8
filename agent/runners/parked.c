/* rune-parked: one command start, made ahead of time inside a container by runc.

   The agent starts it with `runc exec --detach --preserve-fds 2 CONTAINER /proc/self/fd/3
   rune-parked`: fd 3 is this program (a sealed memfd of the agent's, so nothing needs to be
   in the container's filesystem and nothing there can rewrite it), fd 4 the agent's end of
   a SOCK_SEQPACKET pair. runc has already put it where a fresh `runc exec` would put a
   command: the container's namespaces, cgroup, capabilities, seccomp filter, AppArmor
   profile, user, rlimits, environment and working directory, all from the container's
   config.json. It waits for one request and then becomes that command, so what runc spends
   per exec (~35 ms here) is paid before the exec is asked for, not while the user waits.

   A request is one message: struct request, then NUL-terminated strings (the working
   directory, empty for the container's; argc words; envc "KEY=VALUE" overrides) and, without
   a terminal, the command's stdin, stdout and stderr as SCM_RIGHTS. With a terminal this
   program opens the container's own /dev/ptmx (as runc -t does), sizes it, sends the master
   back and makes the slave its controlling terminal. The argv[0] lookup is runc's (Go's
   LookPath over the command's PATH). The control socket is close-on-exec: the agent reads
   EOF when the command runs, or one struct failure and the path it concerns when it cannot.

   Nothing here trusts more than runc's exec would: it runs with exactly the container's
   privileges, and a process in the container that tampers with it can only spoil this one
   exec (the agent takes only a terminal master from it, checked, and counts its exit). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#define EXE_FD 3
#define CONTROL_FD 4
#define REQUEST_LIMIT (256 * 1024)
#define MAGIC 0x31504e52u /* "RNP1" */
#define FLAG_TTY 1u

enum stage { STAGE_REQUEST = 1, STAGE_CHDIR = 2, STAGE_TERMINAL = 3, STAGE_LOOKUP = 4,
             STAGE_EXEC = 5 };

struct request {
    uint32_t magic, flags, cols, rows, argc, envc;
};

struct failure {
    uint32_t stage;
    int32_t error;
};

extern char **environ;
static char buffer[REQUEST_LIMIT];

static void fail(enum stage stage, int error, const char *path)
{
    char message[sizeof(struct failure) + 4096];
    struct failure head = {stage, error};
    size_t length = path ? strnlen(path, 4095) : 0;

    memcpy(message, &head, sizeof head);
    memcpy(message + sizeof head, path ? path : "", length);
    send(CONTROL_FD, message, sizeof head + length, MSG_NOSIGNAL);
    _exit(stage == STAGE_LOOKUP && error == ENOENT ? 127 : 126);
}

/* The next NUL-terminated string at *at, or NULL if the message ends first. */
static char *next_word(char **at, char *end)
{
    char *word = *at, *nul = memchr(word, '\0', (size_t)(end - word));

    if (word >= end || nul == NULL)
        return NULL;
    *at = nul + 1;
    return word;
}

/* The container's environment with the request's KEY=VALUE overrides, later ones winning. */
static char **merged_environment(char **overrides, uint32_t count)
{
    size_t base = 0, used;
    char **env;

    while (environ[base])
        base++;
    env = calloc(base + count + 1, sizeof *env);
    if (env == NULL)
        fail(STAGE_REQUEST, ENOMEM, NULL);
    memcpy(env, environ, base * sizeof *env);
    used = base;
    for (uint32_t i = 0; i < count; i++) {
        const char *eq = strchr(overrides[i], '=');
        size_t key = eq ? (size_t)(eq - overrides[i]) + 1 : strlen(overrides[i]);
        size_t j;

        for (j = 0; j < used; j++)
            if (strncmp(env[j], overrides[i], key) == 0)
                break;
        env[j] = overrides[i];
        if (j == used)
            used++;
    }
    env[used] = NULL;
    return env;
}

static const char *lookup_env(char **env, const char *key)
{
    size_t length = strlen(key);

    for (; *env; env++)
        if (strncmp(*env, key, length) == 0 && (*env)[length] == '=')
            return *env + length + 1;
    return "";
}

/* Go's findExecutable: a regular file with an execute bit, or why not. */
static int executable(const char *path)
{
    struct stat info;

    if (stat(path, &info) < 0)
        return errno;
    if (S_ISDIR(info.st_mode))
        return EISDIR;
    return info.st_mode & 0111 ? 0 : EACCES;
}

/* Go's LookPath, as runc resolves argv[0]: a name with a slash as it is, else the first
   executable file in the PATH's absolute directories (Go since 1.19 refuses what a relative
   entry finds). Failures are told as runc words them: a name not in PATH is ENOENT with no
   path; anything else the error of the named file. */
static const char *resolve(const char *name, const char *path, char *found, size_t size)
{
    int error;

    if (strchr(name, '/')) {
        if ((error = executable(name)) != 0)
            fail(STAGE_LOOKUP, error, name);
        return name;
    }
    while (*path) {
        const char *colon = strchrnul(path, ':');
        int dir = (int)(colon - path);
        int written = snprintf(found, size, "%.*s/%s", dir, path, name);

        if (*path == '/' && written > 0 && (size_t)written < size && executable(found) == 0)
            return found;
        path = *colon ? colon + 1 : colon;
    }
    fail(STAGE_LOOKUP, ENOENT, NULL);
    return NULL;
}

/* The container's own terminal: its master goes to the agent, its slave becomes stdio. */
static void open_terminal(uint32_t cols, uint32_t rows)
{
    struct winsize size = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    char data = 'T';
    char control[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {.iov_base = &data, .iov_len = 1};
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    int unlock = 0, master, slave;

    master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (master < 0)
        fail(STAGE_TERMINAL, errno, "/dev/ptmx");
    if (ioctl(master, TIOCSPTLCK, &unlock) < 0 || ioctl(master, TIOCSWINSZ, &size) < 0)
        fail(STAGE_TERMINAL, errno, "/dev/ptmx");
    slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY);
    if (slave < 0)
        fail(STAGE_TERMINAL, errno, "/dev/ptmx");
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &master, sizeof master);
    if (sendmsg(CONTROL_FD, &message, MSG_NOSIGNAL) != 1)
        _exit(126);  /* the agent is gone: nobody to run for */
    close(master);
    if (ioctl(slave, TIOCSCTTY, 0) < 0)
        fail(STAGE_TERMINAL, errno, "the terminal");
    for (int fd = 0; fd < 3; fd++)
        if (dup2(slave, fd) < 0)
            fail(STAGE_TERMINAL, errno, "the terminal");
    if (slave > 2)
        close(slave);
}

int main(void)
{
    char control[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {.iov_base = buffer, .iov_len = sizeof buffer};
    struct msghdr message = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
    struct request request;
    struct cmsghdr *header;
    int stdio[3] = {-1, -1, -1}, passed = 0;
    char *at, *end, *cwd, **argv, **overrides, **env, found[4096];
    const char *program;
    ssize_t got;

    close(EXE_FD);
    if (fcntl(CONTROL_FD, F_SETFD, FD_CLOEXEC) < 0)
        _exit(126);
    /* runc passes nothing else; should anything else be open, the command must not get it */
    if (syscall(SYS_close_range, CONTROL_FD + 1, ~0u, 0) < 0)
        for (int fd = CONTROL_FD + 1; fd < 4096; fd++)
            close(fd);
    prctl(PR_SET_NAME, "rune-parked", 0, 0, 0);
    do
        got = recvmsg(CONTROL_FD, &message, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got <= 0)
        _exit(0);  /* the agent let this start go (or is gone) */
    for (header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header))
        if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_RIGHTS)
            for (size_t i = 0; i < (header->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
                int fd;

                memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
                if (passed < 3)
                    stdio[passed++] = fd;
                else
                    close(fd);
            }
    if ((message.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) || (size_t)got < sizeof request)
        fail(STAGE_REQUEST, EMSGSIZE, NULL);
    memcpy(&request, buffer, sizeof request);
    if (request.magic != MAGIC || request.argc == 0 || request.argc > (size_t)got
        || request.envc > (size_t)got || passed != ((request.flags & FLAG_TTY) ? 0 : 3))
        fail(STAGE_REQUEST, EINVAL, NULL);
    at = buffer + sizeof request;
    end = buffer + got;
    argv = calloc(request.argc + 1, sizeof *argv);
    overrides = calloc(request.envc + 1, sizeof *overrides);
    if (argv == NULL || overrides == NULL)
        fail(STAGE_REQUEST, ENOMEM, NULL);
    if ((cwd = next_word(&at, end)) == NULL)
        fail(STAGE_REQUEST, EINVAL, NULL);
    for (uint32_t i = 0; i < request.argc; i++)
        if ((argv[i] = next_word(&at, end)) == NULL)
            fail(STAGE_REQUEST, EINVAL, NULL);
    for (uint32_t i = 0; i < request.envc; i++)
        if ((overrides[i] = next_word(&at, end)) == NULL || strchr(overrides[i], '=') == NULL)
            fail(STAGE_REQUEST, EINVAL, NULL);
    env = merged_environment(overrides, request.envc);

    if (getsid(0) != getpid() && setsid() < 0)  /* runc has made it a session's leader */
        fail(STAGE_TERMINAL, errno, NULL);
    if (request.flags & FLAG_TTY) {
        open_terminal(request.cols, request.rows);
    } else {
        for (int fd = 0; fd < 3; fd++)
            if (dup2(stdio[fd], fd) < 0)  /* dup2 leaves close-on-exec off the copy */
                fail(STAGE_REQUEST, errno, NULL);
        for (int fd = 0; fd < 3; fd++)
            if (stdio[fd] > 2)
                close(stdio[fd]);
    }
    if (*cwd && chdir(cwd) < 0)
        fail(STAGE_CHDIR, errno, cwd);
    program = resolve(argv[0], lookup_env(env, "PATH"), found, sizeof found);
    execve(program, argv, env);
    fail(STAGE_EXEC, errno, program);
    return 126;
}
