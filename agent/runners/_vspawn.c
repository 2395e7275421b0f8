/* The agent's child start without copying the agent: vfork, then the same steps, in C.
 *
 * rune.agent.runners.spawn describes the order (privileges first, then the directory, then
 * argv[0]); this is that child written so that it can run on the agent's memory between
 * vfork and execve: no allocation, no Python, raw syscalls for the user switch (glibc's
 * setuid would signal the agent's threads), every signal blocked until the handlers are
 * reset. A fork copies the agent's page tables and faults its heap in (~4 ms and more per
 * child, growing with the agent); a vfork costs the same for any agent (~0.3 ms).
 * A failure is written to the report pipe as the same JSON the Python child writes.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define REPORT_LIMIT 4096
#define PATH_BUF 4096

static const int reset_signals[] = {SIGPIPE, SIGXFSZ, SIGINT, SIGTERM, SIGHUP, SIGQUIT,
                                    SIGCHLD, SIGWINCH, SIGUSR1, SIGUSR2, SIGTSTP, SIGTTIN,
                                    SIGTTOU};

struct plan {
    char *const *argv;
    char *const *envp;
    const char *cwd;
    const char *path_env; /* PATH of the command's environment, or NULL */
    const char *who;      /* the account's name, for messages */
    int do_switch;
    uid_t uid;
    gid_t gid;
    gid_t *groups;
    size_t ngroups;
    int die_with;
    int stdio[3];
    int terminal;
    int report_fd;
};

/* --- the report: {"kind": ..., "code": ..., "message": ...}, strings escaped --------- */

struct out { char buf[REPORT_LIMIT]; size_t len; };

static void put(struct out *o, const char *s) {
    while (*s && o->len < sizeof o->buf - 8) o->buf[o->len++] = *s++;
}

static void put_escaped(struct out *o, const char *s) {
    static const char hex[] = "0123456789abcdef";
    for (; *s && o->len < sizeof o->buf - 16; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            o->buf[o->len++] = '\\';
            o->buf[o->len++] = (char)c;
        } else if (c < 0x20) {
            put(o, "\\u00");
            o->buf[o->len++] = hex[c >> 4];
            o->buf[o->len++] = hex[c & 15];
        } else {
            o->buf[o->len++] = (char)c;
        }
    }
}

static void lower(char *s) {
    for (; *s; s++) if (*s >= 'A' && *s <= 'Z') *s = (char)(*s - 'A' + 'a');
}

/* Writes the report and leaves: kind "exit" with the command's code, or "error" (126). */
static _Noreturn void fail(const struct plan *p, const char *kind, int code, const char *a,
                           const char *b, const char *c, const char *d) {
    struct out o;
    char number[16];
    o.len = 0;
    put(&o, "{\"kind\": \"");
    put(&o, kind);
    put(&o, "\", \"code\": ");
    snprintf(number, sizeof number, "%d", code);
    put(&o, number);
    put(&o, ", \"message\": \"");
    put_escaped(&o, a);
    if (b) put_escaped(&o, b);
    if (c) put_escaped(&o, c);
    if (d) put_escaped(&o, d);
    put(&o, "\"}");
    if (write(p->report_fd, o.buf, o.len) < 0) { /* nobody to tell */ }
    _exit(code ? code : 126);
}

static _Noreturn void fail_errno(const struct plan *p, const char *what, int err) {
    fail(p, "error", 0, what, strerror(err), NULL, NULL);
}

/* --- the steps ----------------------------------------------------------------------- */

static void drop_privileges(const struct plan *p) {
    char what[256];
    snprintf(what, sizeof what, "cannot switch user as %s: ", p->who);
    if (syscall(SYS_setgroups, p->ngroups, p->groups) != 0
            || syscall(SYS_setresgid, p->gid, p->gid, p->gid) != 0
            || syscall(SYS_setresuid, p->uid, p->uid, p->uid) != 0)
        fail_errno(p, what, errno);
    if (getuid() != p->uid || geteuid() != p->uid)
        fail(p, "error", 0, what, "still not the account's uid after setuid", NULL, NULL);
}

static void enter(const struct plan *p) {
    if (chdir(p->cwd) == 0) return;
    int err = errno;
    if (err == ENOENT) fail(p, "exit", 126, "workdir ", p->cwd, ": no such directory", NULL);
    if (err == ENOTDIR) fail(p, "exit", 126, "workdir ", p->cwd, ": not a directory", NULL);
    if (err == EACCES || err == EPERM)
        fail(p, "exit", 126, "workdir ", p->cwd, ": permission denied", NULL);
    char what[256];
    snprintf(what, sizeof what, "cannot start as %s: ", p->who);
    fail_errno(p, what, err);
}

/* argv[0] as execvp would find it, 127 for missing and 126 for not executable (as
 * rune.agent.runners.base.resolve_executable). Writes the path into `found`. */
static void resolve(const struct plan *p, char *found) {
    const char *command = p->argv[0];
    struct stat st;
    if (strchr(command, '/')) {
        if (stat(command, &st) != 0)
            fail(p, "exit", 127, "exec: \"", command, "\": no such file or directory", NULL);
        if (S_ISDIR(st.st_mode) || access(command, X_OK) != 0)
            fail(p, "exit", 126, "exec: \"", command, "\": permission denied", NULL);
        snprintf(found, PATH_BUF, "%s", command);
        return;
    }
    const char *dirs = p->path_env ? p->path_env : "/bin:/usr/bin";
    int unexecutable = 0;
    for (;;) {
        const char *end = strchr(dirs, ':');
        size_t n = end ? (size_t)(end - dirs) : strlen(dirs);
        int len;
        if (n == 0)
            len = snprintf(found, PATH_BUF, "./%s", command);
        else if (dirs[n - 1] == '/')
            len = snprintf(found, PATH_BUF, "%.*s%s", (int)n, dirs, command);
        else
            len = snprintf(found, PATH_BUF, "%.*s/%s", (int)n, dirs, command);
        if (len > 0 && len < PATH_BUF && stat(found, &st) == 0 && S_ISREG(st.st_mode)) {
            if (access(found, X_OK) == 0) return;
            unexecutable = 1;
        }
        if (!end) break;
        dirs = end + 1;
    }
    if (unexecutable)
        fail(p, "exit", 126, "exec: \"", command, "\": permission denied", NULL);
    fail(p, "exit", 127, "exec: \"", command, "\": executable file not found in $PATH", NULL);
}

static _Noreturn void child(const struct plan *p) {
    struct plan q = *p;
    char found[PATH_BUF];
    /* Above the stdio slots, so that placing stdio cannot overwrite it. */
    int report = fcntl(p->report_fd, F_DUPFD_CLOEXEC, 3);
    if (report < 0) _exit(126);
    q.report_fd = report;
    for (int sig = 1; sig < NSIG; sig++) {
        /* The agent's handlers are Python's: none may run here, and exec resets them. */
        struct sigaction old;
        int reset = 0;
        for (size_t i = 0; i < sizeof reset_signals / sizeof *reset_signals; i++)
            reset |= reset_signals[i] == sig;
        if (sigaction(sig, NULL, &old) != 0) continue;
        if (reset || (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN))
            signal(sig, SIG_DFL);
    }
    if (setsid() < 0) fail_errno(&q, "cannot start the command: setsid: ", errno);
    if (q.terminal >= 0 && ioctl(q.terminal, TIOCSCTTY, 0) != 0)
        fail_errno(&q, "cannot start the command: controlling terminal: ", errno);
    for (int target = 0; target < 3; target++)
        if (dup2(q.stdio[target], target) < 0)
            fail_errno(&q, "cannot start the command: stdio: ", errno);
    /* The report pipe moves down to 3 and one close_range takes everything above: an
       agent with many instances has hundreds of descriptors open, each a syscall of this
       child's if closed one by one. */
    if (report != 3) {
        if (dup3(report, 3, O_CLOEXEC) < 0)
            fail_errno(&q, "cannot start the command: report pipe: ", errno);
        q.report_fd = report = 3;
    }
    if (syscall(SYS_close_range, 4, ~0U, 0) != 0)
        for (int fd = 4; fd < 65536; fd++) close(fd);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (q.do_switch) drop_privileges(&q);
    if (q.die_with) {
        /* After the user switch, which would clear it; the agent may already be gone. */
        prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
        if (getppid() != q.die_with) _exit(255);
    }
    enter(&q);
    resolve(&q, found);
    execve(found, q.argv, q.envp);
    int err = errno;
    if (err == ENOENT) /* e.g. a script whose interpreter is missing */
        fail(&q, "exit", 127, "exec: \"", q.argv[0], "\": no such file or directory", NULL);
    char reason[128];
    snprintf(reason, sizeof reason, "%s", strerror(err));
    lower(reason);
    fail(&q, "exit", 126, "exec: \"", q.argv[0], "\": ", reason);
}

/* --- the Python side ------------------------------------------------------------------ */

/* A NULL-terminated char* array of a list of bytes (each without NUL); NULL on error. */
static char **byte_array(PyObject *list, PyObject **keep) {
    Py_ssize_t n = PyList_Size(list);
    if (n < 0) return NULL;
    char **out = PyMem_Calloc((size_t)n + 1, sizeof *out);
    if (!out) { PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        char *s;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(item, &s, &len) < 0) { PyMem_Free(out); return NULL; }
        if ((Py_ssize_t)strlen(s) != len) {
            PyErr_SetString(PyExc_ValueError, "embedded null byte");
            PyMem_Free(out);
            return NULL;
        }
        out[i] = s;
    }
    *keep = list;
    return out;
}

static PyObject *vspawn(PyObject *self, PyObject *args) {
    PyObject *argv_list, *env_list, *groups_list, *path_obj;
    const char *cwd, *who;
    int do_switch, die_with, in_fd, out_fd, err_fd, terminal, report_fd;
    unsigned int uid, gid;
    PyObject *keep;
    if (!PyArg_ParseTuple(args, "O!O!yOyiIIO!i(iii)ii", &PyList_Type, &argv_list,
                          &PyList_Type, &env_list, &cwd, &path_obj, &who, &do_switch, &uid,
                          &gid, &PyList_Type, &groups_list, &die_with, &in_fd, &out_fd,
                          &err_fd, &terminal, &report_fd))
        return NULL;
    if (PyList_Size(argv_list) < 1) {
        PyErr_SetString(PyExc_ValueError, "argv is empty");
        return NULL;
    }
    struct plan p = {0};
    p.cwd = cwd;
    p.who = who;
    p.do_switch = do_switch;
    p.uid = uid;
    p.gid = gid;
    p.die_with = die_with;
    p.stdio[0] = in_fd;
    p.stdio[1] = out_fd;
    p.stdio[2] = err_fd;
    p.terminal = terminal;
    p.report_fd = report_fd;
    if (path_obj != Py_None) {
        p.path_env = PyBytes_AsString(path_obj);
        if (!p.path_env) return NULL;
    }
    char **argv = byte_array(argv_list, &keep);
    if (!argv) return NULL;
    char **envp = byte_array(env_list, &keep);
    if (!envp) { PyMem_Free(argv); return NULL; }
    Py_ssize_t ngroups = PyList_Size(groups_list);
    gid_t *groups = PyMem_Calloc((size_t)ngroups + 1, sizeof *groups);
    if (!groups) { PyMem_Free(argv); PyMem_Free(envp); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < ngroups; i++) {
        unsigned long g = PyLong_AsUnsignedLong(PyList_GET_ITEM(groups_list, i));
        if (PyErr_Occurred()) { PyMem_Free(argv); PyMem_Free(envp); PyMem_Free(groups); return NULL; }
        groups[i] = (gid_t)g;
    }
    p.argv = argv;
    p.envp = envp;
    p.groups = groups;
    p.ngroups = (size_t)ngroups;

    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t pid = vfork();
    if (pid == 0) child(&p);
    int err = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    PyMem_Free(argv);
    PyMem_Free(envp);
    PyMem_Free(groups);
    if (pid < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(pid);
}

static PyMethodDef methods[] = {
    {"vspawn", vspawn, METH_VARARGS,
     "vspawn(argv, env, cwd, path, who, switch, uid, gid, groups, die_with, stdio, terminal, "
     "report_fd) -> pid: the child of rune.agent.runners.spawn, started by vfork."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_vspawn", NULL, -1, methods};

PyMODINIT_FUNC PyInit__vspawn(void) { return PyModule_Create(&module); }
