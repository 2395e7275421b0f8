/* The bench's producer: writes N zero bytes to stdout in 1 MiB writes, then exits 0.
 * Built with `cc -static` at bench time, so the very same binary runs on the host and in
 * any container image, and every contender streams the same bytes from the same code. */
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static char zeros[1 << 20];

int main(int argc, char **argv) {
    long long left = argc > 1 ? atoll(argv[1]) : 0;
    while (left > 0) {
        size_t want = left < (long long)sizeof zeros ? (size_t)left : sizeof zeros;
        ssize_t wrote = write(1, zeros, want);
        if (wrote < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        left -= wrote;
    }
    return 0;
}
