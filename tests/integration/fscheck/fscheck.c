/*
 * fscheck: file-semantics checks for tests/integration/test_file_semantics.py.
 *
 * Built statically by the test session (gcc -static), so the very same binary runs in a runc
 * container on the host and in a pysandbox container (busybox rootfs, no libc needed).
 *
 *   fscheck suite DIR            run every check below DIR (created, must not exist);
 *                                one JSON object per line: {"check": NAME, "result": TEXT}
 *   fscheck lock KIND MODE FILE [SECONDS]
 *                                KIND flock|posix|ofd, or all (each kind on FILE.KIND, one
 *                                line each); MODE try (non-blocking), wait (blocking,
 *                                given up after SECONDS with "timeout"), hold (take it at once,
 *                                print, keep it until stdin ends or SECONDS pass, release);
 *                                prints one JSON object:
 *                                {"lock": KIND, "mode": MODE, "result": "acquired"|ERRNO|"timeout",
 *                                 "waited_ms": N}
 *   fscheck watch DIR SECONDS    print the inotify events on DIR for SECONDS, one "event:name"
 *                                per line (changes made elsewhere: host, other pods)
 *   fscheck connect PATH         connect to the unix socket PATH and send "ping"; prints
 *                                "connected" or the errno name
 *   fscheck bench DIR            time a create loop (500 files), small appends (2000 x 100 B)
 *                                and a 64 MiB sequential write + fsync below DIR; one JSON
 *                                object: {"create_ms": N, "append_ms": N, "write_ms": N}
 *
 * Results are written so that they do not depend on the machine: no inode numbers, no
 * absolute times, errno names instead of numbers. Must run as root (with the default
 * container capabilities): permission checks fork a child that drops to the test users
 * 1002:1003 (supplementary group 1001) and 1004:1004.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/falloc.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#define RESULT_MAX 512

static char *shared_result; /* MAP_SHARED page: what a forked child reports */

static const char *ename(int e)
{
    const char *name = strerrorname_np(e);
    return name ? name : "E?";
}

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') {
            printf("\\%c", *s);
        } else if ((unsigned char)*s < 0x20) {
            printf("\\u%04x", *s);
        } else {
            putchar(*s);
        }
    }
    putchar('"');
}

static void emit(const char *check, const char *fmt, ...)
{
    char buf[RESULT_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    printf("{\"check\": ");
    json_string(check);
    printf(", \"result\": ");
    json_string(buf);
    printf("}\n");
    fflush(stdout);
}

/* "ok" or the errno name of the last failure */
static const char *rc(int r)
{
    return r < 0 ? ename(errno) : "ok";
}

static void die(const char *what)
{
    fprintf(stderr, "fscheck: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void setup_mkdir(const char *path, mode_t mode, uid_t uid, gid_t gid)
{
    if (mkdir(path, 0700) < 0 || chown(path, uid, gid) < 0 || chmod(path, mode) < 0) {
        die(path);
    }
}

static void setup_file(const char *path, const char *data, mode_t mode, uid_t uid, gid_t gid)
{
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0600);
    if (fd < 0 || write(fd, data, strlen(data)) != (ssize_t)strlen(data) ||
        fchown(fd, uid, gid) < 0 || fchmod(fd, mode) < 0) {
        die(path);
    }
    close(fd);
}

static char *owner_mode(const char *path, char *buf, size_t size)
{
    struct stat st;
    if (lstat(path, &st) < 0) {
        snprintf(buf, size, "%s", ename(errno));
    } else {
        snprintf(buf, size, "%u:%u %04o", st.st_uid, st.st_gid, st.st_mode & 07777);
    }
    return buf;
}

/* Run fn(arg) in a child with the given credentials; return what it wrote to shared_result. */
typedef void (*as_fn)(const char *arg, char *out);

static const char *as_user(uid_t uid, gid_t gid, int ngroups, const gid_t *groups, as_fn fn,
                           const char *arg)
{
    memset(shared_result, 0, RESULT_MAX);
    pid_t pid = fork();
    if (pid < 0) {
        die("fork");
    }
    if (pid == 0) {
        if (setgroups(ngroups, groups) < 0 || setresgid(gid, gid, gid) < 0 ||
            setresuid(uid, uid, uid) < 0) {
            snprintf(shared_result, RESULT_MAX, "setup %s", ename(errno));
            _exit(0);
        }
        umask(022);
        fn(arg, shared_result);
        _exit(0);
    }
    int status;
    waitpid(pid, &status, 0);
    return shared_result;
}

static const gid_t member_groups[] = {1001};
#define AS_MEMBER(fn, arg) as_user(1002, 1003, 1, member_groups, fn, arg)
#define AS_STRANGER(fn, arg) as_user(1004, 1004, 0, NULL, fn, arg)

static void do_create(const char *path, char *out)
{
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0666);
    if (fd < 0) {
        snprintf(out, RESULT_MAX, "%s", ename(errno));
        return;
    }
    close(fd);
    owner_mode(path, out, RESULT_MAX);
}

static void do_create_sgid(const char *path, char *out)
{
    int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 02755);
    if (fd < 0) {
        snprintf(out, RESULT_MAX, "%s", ename(errno));
        return;
    }
    close(fd);
    owner_mode(path, out, RESULT_MAX);
}

static void do_mkdir(const char *path, char *out)
{
    if (mkdir(path, 0777) < 0) {
        snprintf(out, RESULT_MAX, "%s", ename(errno));
        return;
    }
    owner_mode(path, out, RESULT_MAX);
}

static void do_read(const char *path, char *out)
{
    char buf[16] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        snprintf(out, RESULT_MAX, "%s", ename(errno));
        return;
    }
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    snprintf(out, RESULT_MAX, n < 0 ? "%s" : "read %s", n < 0 ? ename(errno) : buf);
    close(fd);
}

static void do_unlink(const char *path, char *out)
{
    snprintf(out, RESULT_MAX, "%s", rc(unlink(path)));
}

static void do_chmod_0600(const char *path, char *out)
{
    snprintf(out, RESULT_MAX, "%s", rc(chmod(path, 0600)));
}

static void do_chmod_sgid(const char *path, char *out)
{
    char om[64];
    int r = chmod(path, 02755);
    snprintf(out, RESULT_MAX, "%s %s", rc(r), owner_mode(path, om, sizeof(om)));
}

static void do_chown_user(const char *path, char *out)
{
    char om[64];
    const char *other = rc(chown(path, 1004, -1));
    const char *member = rc(chown(path, -1, 1001));
    const char *foreign = rc(chown(path, -1, 1005));
    snprintf(out, RESULT_MAX, "to-uid-1004=%s to-gid-1001=%s to-gid-1005=%s now %s", other, member,
             foreign, owner_mode(path, om, sizeof(om)));
}

static void do_append_write(const char *path, char *out)
{
    char om[64];
    int fd = open(path, O_WRONLY | O_APPEND);
    if (fd < 0) {
        snprintf(out, RESULT_MAX, "open %s", ename(errno));
        return;
    }
    ssize_t n = write(fd, "x", 1);
    close(fd);
    snprintf(out, RESULT_MAX, "%s %s", n == 1 ? "ok" : ename(errno),
             owner_mode(path, om, sizeof(om)));
}

static char dir[2048]; /* the suite's directory */

static const char *P(const char *name)
{
    static char paths[8][4096];
    static int next;
    char *p = paths[next++ % 8];
    snprintf(p, 4096, "%s/%s", dir, name);
    return p;
}

static void check_permissions(void)
{
    char a[RESULT_MAX], b[RESULT_MAX], om[64];

    setup_mkdir(P("grp"), 0775, 0, 1001);
    snprintf(a, sizeof(a), "%s", AS_MEMBER(do_create, P("grp/f")));
    snprintf(b, sizeof(b), "%s", AS_MEMBER(do_mkdir, P("grp/d")));
    emit("perm.create_via_supplementary_group", "file %s; dir %s", a, b);
    emit("perm.create_without_group", "%s", AS_STRANGER(do_create, P("grp/g")));

    setup_mkdir(P("sgid"), 02775, 0, 1001);
    snprintf(a, sizeof(a), "%s", AS_MEMBER(do_create, P("sgid/f")));
    snprintf(b, sizeof(b), "%s", AS_MEMBER(do_mkdir, P("sgid/d")));
    emit("perm.setgid_dir_inherits_group", "file %s; dir %s", a, b);

    setup_mkdir(P("sgid-foreign"), 02777, 0, 1005);
    emit("perm.setgid_bit_stripped_for_nonmember", "%s",
         AS_MEMBER(do_create_sgid, P("sgid-foreign/f")));
    emit("perm.setgid_bit_kept_for_member", "%s", AS_MEMBER(do_create_sgid, P("sgid/s")));

    setup_file(P("grp-readable"), "secret", 0640, 0, 1001);
    snprintf(a, sizeof(a), "%s", AS_MEMBER(do_read, P("grp-readable")));
    emit("perm.read_via_supplementary_group", "member %s; stranger %s", a,
         AS_STRANGER(do_read, P("grp-readable")));

    setup_mkdir(P("sticky"), 01777, 0, 0);
    setup_file(P("sticky/f"), "x", 0666, 1002, 1003);
    snprintf(a, sizeof(a), "%s", AS_STRANGER(do_unlink, P("sticky/f")));
    emit("perm.sticky_dir_unlink", "stranger %s; owner %s", a, AS_MEMBER(do_unlink, P("sticky/f")));

    int fd = open(P("root-new"), O_CREAT | O_EXCL | O_WRONLY, 0666);
    close(fd);
    emit("own.new_file_as_root", "%s", owner_mode(P("root-new"), om, sizeof(om)));

    setup_mkdir(P("open"), 0777, 0, 0);
    emit("own.new_file_as_user", "%s", AS_MEMBER(do_create, P("open/u")));

    setup_file(P("mine"), "x", 0644, 1002, 1003);
    setup_file(P("roots"), "x", 0644, 0, 0);
    snprintf(a, sizeof(a), "%s", AS_MEMBER(do_chmod_0600, P("mine")));
    emit("chmod.by_owner_and_by_other", "own %s; root's %s", a,
         AS_MEMBER(do_chmod_0600, P("roots")));

    setup_file(P("foreign-group"), "x", 0644, 1002, 1005);
    emit("chmod.setgid_cleared_for_nonmember", "%s",
         AS_MEMBER(do_chmod_sgid, P("foreign-group")));

    setup_file(P("chown-me"), "x", 0644, 0, 0);
    int r = chown(P("chown-me"), 1234, 5678);
    emit("chown.by_root", "%s %s", rc(r), owner_mode(P("chown-me"), om, sizeof(om)));

    setup_file(P("chown-user"), "x", 0644, 1002, 1003);
    emit("chown.by_user", "%s", AS_MEMBER(do_chown_user, P("chown-user")));

    setup_file(P("setuid-file"), "x", 06777, 1004, 1004);
    emit("write.by_other_clears_setuid", "%s", AS_MEMBER(do_append_write, P("setuid-file")));
}

static void check_links(void)
{
    char buf[32] = {0};
    struct stat st, st2;

    setup_file(P("a"), "hello", 0644, 0, 0);
    int r = link(P("a"), P("b"));
    stat(P("a"), &st);
    stat(P("b"), &st2);
    int fd = open(P("b"), O_WRONLY | O_APPEND);
    write(fd, "!", 1);
    close(fd);
    fd = open(P("a"), O_RDONLY);
    read(fd, buf, sizeof(buf) - 1);
    close(fd);
    unlink(P("a"));
    struct stat after;
    stat(P("b"), &after);
    emit("link.hard", "%s nlink=%lu same-inode=%s a-reads=%s nlink-after-unlink=%lu", rc(r),
         (unsigned long)st.st_nlink, st.st_ino == st2.st_ino ? "yes" : "no", buf,
         (unsigned long)after.st_nlink);

    r = symlink("target/x", P("sym"));
    ssize_t n = readlink(P("sym"), buf, sizeof(buf) - 1);
    buf[n < 0 ? 0 : n] = 0;
    lstat(P("sym"), &st);
    emit("link.symlink", "%s readlink=%s lnk=%s", rc(r), buf, S_ISLNK(st.st_mode) ? "yes" : "no");
}

static void check_rename_unlink(void)
{
    char buf[32] = {0}, path_buf[32] = {0};
    struct stat st;

    setup_file(P("ren-old"), "old", 0644, 0, 0);
    setup_file(P("ren-new"), "new", 0644, 0, 0);
    int fd = open(P("ren-old"), O_RDONLY);
    int r = rename(P("ren-new"), P("ren-old"));
    pread(fd, buf, sizeof(buf) - 1, 0);
    fstat(fd, &st);
    int fd2 = open(P("ren-old"), O_RDONLY);
    read(fd2, path_buf, sizeof(path_buf) - 1);
    close(fd2);
    emit("rename.over_open_file", "%s open-fd-reads=%s path-reads=%s open-fd-nlink=%lu", rc(r),
         buf, path_buf, (unsigned long)st.st_nlink);
    close(fd);

    setup_file(P("unl"), "data", 0644, 0, 0);
    fd = open(P("unl"), O_RDWR);
    r = unlink(P("unl"));
    fstat(fd, &st);
    ssize_t w = pwrite(fd, "more", 4, 4);
    memset(buf, 0, sizeof(buf));
    pread(fd, buf, sizeof(buf) - 1, 0);
    struct stat gone;
    int s = stat(P("unl"), &gone);
    emit("unlink.open_file", "%s nlink=%lu write=%s reads=%s path=%s", rc(r),
         (unsigned long)st.st_nlink, w == 4 ? "ok" : ename(errno), buf, s < 0 ? ename(errno) : "exists");
    close(fd);

    setup_file(P("x1"), "one", 0644, 0, 0);
    setup_file(P("x2"), "two", 0644, 0, 0);
    int noreplace = renameat2(AT_FDCWD, P("x1"), AT_FDCWD, P("x2"), RENAME_NOREPLACE);
    const char *nr = rc(noreplace);
    int exchange = renameat2(AT_FDCWD, P("x1"), AT_FDCWD, P("x2"), RENAME_EXCHANGE);
    memset(buf, 0, sizeof(buf));
    fd = open(P("x1"), O_RDONLY);
    read(fd, buf, sizeof(buf) - 1);
    close(fd);
    emit("rename.flags", "noreplace=%s exchange=%s x1-now=%s", nr, rc(exchange), buf);

    setup_mkdir(P("full"), 0755, 0, 0);
    setup_file(P("full/f"), "x", 0644, 0, 0);
    r = rmdir(P("full"));
    const char *rm = rc(r);
    r = open(P("full/f"), O_CREAT | O_EXCL | O_WRONLY, 0644);
    const char *excl = rc(r);
    r = open(P("full/f"), O_RDONLY | O_DIRECTORY);
    emit("errors.basic", "rmdir-nonempty=%s create-excl-existing=%s o_directory-on-file=%s", rm,
         excl, rc(r));
}

static void check_append_direct_tmpfile(void)
{
    char buf[64] = {0};

    int fd1 = open(P("app"), O_CREAT | O_WRONLY | O_APPEND, 0644);
    int fd2 = open(P("app"), O_WRONLY | O_APPEND);
    write(fd1, "a", 1);
    write(fd2, "b", 1);
    write(fd1, "c", 1);
    ssize_t pw = pwrite(fd1, "P", 1, 0);
    close(fd1);
    close(fd2);
    int fd = open(P("app"), O_RDONLY);
    read(fd, buf, sizeof(buf) - 1);
    close(fd);
    emit("append.two_fds_and_pwrite", "pwrite=%s content=%s", pw == 1 ? "ok" : ename(errno), buf);

    fd = open(P("direct"), O_CREAT | O_RDWR | O_DIRECT, 0644);
    if (fd < 0) {
        emit("open.o_direct", "open %s", ename(errno));
    } else {
        void *block = NULL;
        if (posix_memalign(&block, 4096, 4096) != 0) {
            die("posix_memalign");
        }
        memset(block, 'd', 4096);
        ssize_t w = pwrite(fd, block, 4096, 0);
        const char *wr = w == 4096 ? "ok" : ename(errno);
        memset(block, 0, 4096);
        ssize_t r = pread(fd, block, 4096, 0);
        emit("open.o_direct", "open ok write=%s read=%s", wr,
             r == 4096 && ((char *)block)[4095] == 'd' ? "ok" : ename(errno));
        ssize_t u = pwrite(fd, (char *)block + 1, 100, 1); /* misaligned buffer, offset, size */
        emit("open.o_direct_unaligned", "write=%s", u < 0 ? ename(errno) : "ok");
        free(block);
        close(fd);
    }

    fd = open(dir, O_TMPFILE | O_RDWR, 0600);
    if (fd < 0) {
        emit("open.o_tmpfile", "open %s", ename(errno));
    } else {
        char proc[64];
        write(fd, "tmp", 3);
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        int r = linkat(AT_FDCWD, proc, AT_FDCWD, P("tmp-linked"), AT_SYMLINK_FOLLOW);
        struct stat st;
        emit("open.o_tmpfile", "open ok link=%s size=%ld", rc(r),
             stat(P("tmp-linked"), &st) == 0 ? (long)st.st_size : -1L);
        close(fd);
    }
}

static void mmap_case(const char *name, const char *file, int flags, int map)
{
    char at100[8] = {0}, at1124[8] = {0};
    int fd = open(P(file), O_RDWR | O_CREAT | O_TRUNC | flags, 0644);
    ftruncate(fd, 1024);
    char *p = mmap(NULL, 1024, PROT_READ | PROT_WRITE, map, fd, 0);
    if (p == MAP_FAILED) {
        emit(name, "mmap %s", ename(errno));
        close(fd);
        return;
    }
    memcpy(p + 100, "MMAPOK", 6);
    int s = msync(p, 1024, MS_SYNC);
    char seen = p[100];
    munmap(p, 1024);
    close(fd);
    fd = open(P(file), O_RDONLY); /* a fresh open: what any reader sees */
    struct stat st;
    fstat(fd, &st);
    pread(fd, at100, 6, 100);
    pread(fd, at1124, 6, 1124);
    close(fd);
    emit(name, "msync=%s size=%ld at100=%s at1124=%s map-shows=%c", rc(s), (long)st.st_size,
         at100[0] ? at100 : "-", at1124[0] ? at1124 : "-", seen);
}

static void check_mmap(void)
{
    mmap_case("mmap.shared_write", "mm-shared", 0, MAP_SHARED);
    mmap_case("mmap.shared_write_o_append", "mm-append", O_APPEND, MAP_SHARED);
    mmap_case("mmap.private_write", "mm-private", 0, MAP_PRIVATE);

    int fd = open(P("mm-coherent"), O_RDWR | O_CREAT, 0644);
    ftruncate(fd, 4096);
    char *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
    pwrite(fd, "WRITTEN", 7, 10);
    emit("mmap.sees_write_through_fd", "%.7s", p + 10);
    munmap(p, 4096);
    close(fd);
}

static void check_truncate_sync_fallocate(void)
{
    char buf[16] = {0};
    struct stat st;

    setup_file(P("trunc"), "0123456789abcdef", 0644, 0, 0);
    int fd = open(P("trunc"), O_RDWR);
    int r1 = ftruncate(fd, 10000);
    char z = 'x';
    pread(fd, &z, 1, 5000);
    int r2 = truncate(P("trunc"), 4);
    fstat(fd, &st);
    pread(fd, buf, sizeof(buf) - 1, 0);
    emit("truncate.grow_and_shrink", "grow=%s zero-filled=%s shrink=%s size=%ld content=%s",
         rc(r1), z == 0 ? "yes" : "no", rc(r2), (long)st.st_size, buf);

    int a = fsync(fd), b = fdatasync(fd);
    int c = sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);
    int d = syncfs(fd);
    emit("sync.calls", "fsync=%s fdatasync=%s sync_file_range=%s syncfs=%s", rc(a), rc(b),
         rc(c), rc(d));
    close(fd);

    fd = open(P("falloc"), O_RDWR | O_CREAT, 0644);
    int f0 = fallocate(fd, 0, 0, 1 << 20);
    fstat(fd, &st);
    long size0 = st.st_size;
    int fk = fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20);
    fstat(fd, &st);
    long sizek = st.st_size;
    pwrite(fd, "abcd", 4, 4096);
    int fp = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 8192);
    char c0 = 'x';
    pread(fd, &c0, 1, 4096);
    int fz = fallocate(fd, FALLOC_FL_ZERO_RANGE, 0, 4096);
    int fc = fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096);
    emit("fallocate.modes",
         "default=%s size=%ld keep_size=%s size=%ld punch_hole=%s reads-zero=%s zero_range=%s "
         "collapse_range=%s",
         rc(f0), size0, rc(fk), sizek, rc(fp), c0 == 0 ? "yes" : "no", rc(fz), rc(fc));
    close(fd);

    int cfd_in = open(P("trunc"), O_RDONLY), cfd_out = open(P("copy"), O_CREAT | O_WRONLY, 0644);
    ssize_t copied = copy_file_range(cfd_in, NULL, cfd_out, NULL, 4, 0);
    emit("copy_file_range", "%s", copied < 0 ? ename(errno) : (copied == 4 ? "ok 4" : "short"));
    close(cfd_in);
    close(cfd_out);
}

static void check_xattrs(void)
{
    char buf[64] = {0};
    setup_file(P("xa"), "x", 0644, 0, 0);

    int s = setxattr(P("xa"), "user.pysandbox", "value", 5, 0);
    ssize_t g = getxattr(P("xa"), "user.pysandbox", buf, sizeof(buf) - 1);
    char list[256] = {0};
    ssize_t l = listxattr(P("xa"), list, sizeof(list));
    int listed = 0;
    for (ssize_t i = 0; l > 0 && i < l; i += strlen(list + i) + 1) {
        listed |= strcmp(list + i, "user.pysandbox") == 0;
    }
    int rm = removexattr(P("xa"), "user.pysandbox");
    emit("xattr.user", "set=%s get=%s listed=%s remove=%s", rc(s), g < 0 ? ename(errno) : buf,
         listed ? "yes" : "no", rc(rm));

    /* cap_net_raw+ep, VFS_CAP_REVISION_2: what setcap writes */
    unsigned char cap[20] = {0};
    cap[3] = 0x02;                     /* revision 2 */
    cap[0] = 0x01;                     /* effective */
    cap[4 + 1] = 1 << (13 - 8);        /* permitted: CAP_NET_RAW = 13 */
    setup_file(P("fcap"), "x", 0755, 0, 0);
    s = setxattr(P("fcap"), "security.capability", cap, sizeof(cap), 0);
    unsigned char back[32];
    g = getxattr(P("fcap"), "security.capability", back, sizeof(back));
    emit("xattr.file_capability", "set=%s get=%s", rc(s),
         g < 0 ? ename(errno) : (g == sizeof(cap) && !memcmp(cap, back, g) ? "same" : "differs"));

    s = setxattr(P("xa"), "trusted.pysandbox", "v", 1, 0);
    emit("xattr.trusted", "set=%s", rc(s));

    /* a POSIX ACL granting user 1004 read: header + user_obj, user 1004, group_obj, mask, other */
    struct {
        unsigned int version;
        struct {
            unsigned short tag, perm;
            unsigned int id;
        } e[5];
    } acl = {2, {{1, 6, -1}, {2, 4, 1004}, {4, 4, -1}, {0x10, 4, -1}, {0x20, 0, -1}}};
    setup_file(P("acl"), "acl-data", 0640, 0, 0);
    s = setxattr(P("acl"), "system.posix_acl_access", &acl, sizeof(acl), 0);
    emit("acl.grant_read_to_user", "set=%s stranger-reads=%s", rc(s),
         AS_STRANGER(do_read, P("acl")));
}

static void check_special_files(void)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char buf[16] = {0};

    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", P("sock"));
    int srv = socket(AF_UNIX, SOCK_STREAM, 0);
    int b = bind(srv, (struct sockaddr *)&addr, sizeof(addr));
    listen(srv, 1);
    pid_t pid = fork();
    if (pid == 0) {
        int c = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
            write(c, "ping", 4);
        }
        _exit(0);
    }
    int conn = accept(srv, NULL, NULL);
    ssize_t n = conn < 0 ? -1 : read(conn, buf, sizeof(buf) - 1);
    waitpid(pid, NULL, 0);
    struct stat st;
    lstat(P("sock"), &st);
    emit("special.unix_socket", "bind=%s received=%s type-socket=%s", rc(b),
         n > 0 ? buf : ename(errno), S_ISSOCK(st.st_mode) ? "yes" : "no");
    close(conn);
    close(srv);

    int m = mkfifo(P("fifo"), 0644);
    pid = fork();
    if (pid == 0) {
        int w = open(P("fifo"), O_WRONLY);
        write(w, "through", 7);
        _exit(0);
    }
    int r = open(P("fifo"), O_RDONLY);
    memset(buf, 0, sizeof(buf));
    n = r < 0 ? -1 : read(r, buf, sizeof(buf) - 1);
    waitpid(pid, NULL, 0);
    emit("special.fifo", "mkfifo=%s received=%s", rc(m), n > 0 ? buf : ename(errno));
    close(r);

    int k = mknod(P("null"), S_IFCHR | 0666, makedev(1, 3));
    lstat(P("null"), &st);
    emit("special.char_device", "mknod=%s type-chr=%s", rc(k), S_ISCHR(st.st_mode) ? "yes" : "no");
}

static void check_inotify(void)
{
    setup_mkdir(P("watched"), 0755, 0, 0);
    int in = inotify_init1(IN_NONBLOCK);
    int wd = inotify_add_watch(in, P("watched"), IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE |
                                                     IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE |
                                                     IN_ATTRIB);
    if (wd < 0) {
        emit("inotify.changes_made_inside", "watch %s", ename(errno));
        return;
    }
    int fd = open(P("watched/f"), O_CREAT | O_WRONLY, 0644);
    write(fd, "x", 1);
    close(fd);
    chmod(P("watched/f"), 0600);
    rename(P("watched/f"), P("watched/g"));
    unlink(P("watched/g"));
    char events[2048] = {0}, buf[4096] __attribute__((aligned(8)));
    ssize_t n = read(in, buf, sizeof(buf));
    for (char *p = buf; n > 0 && p < buf + n;) {
        struct inotify_event *e = (struct inotify_event *)p;
        const char *what = e->mask & IN_CREATE        ? "create"
                           : e->mask & IN_MODIFY      ? "modify"
                           : e->mask & IN_CLOSE_WRITE ? "close_write"
                           : e->mask & IN_ATTRIB      ? "attrib"
                           : e->mask & IN_MOVED_FROM  ? "moved_from"
                           : e->mask & IN_MOVED_TO    ? "moved_to"
                           : e->mask & IN_DELETE      ? "delete"
                                                      : "other";
        snprintf(events + strlen(events), sizeof(events) - strlen(events), "%s%s:%s",
                 events[0] ? " " : "", what, e->len ? e->name : "");
        p += sizeof(*e) + e->len;
    }
    emit("inotify.changes_made_inside", "%s", n < 0 ? ename(errno) : events);
    close(in);
}

static void check_sparse_large(void)
{
    struct stat st;
    int fd = open(P("sparse"), O_CREAT | O_RDWR, 0644);
    pwrite(fd, "x", 1, 1 << 20);
    fstat(fd, &st);
    off_t data = lseek(fd, 0, SEEK_DATA);
    off_t hole = lseek(fd, 0, SEEK_HOLE);
    emit("sparse.seek_data_hole", "size=%ld data=%ld hole=%ld allocated<=64KiB=%s",
         (long)st.st_size, (long)data, (long)hole, st.st_blocks * 512 <= 65536 ? "yes" : "no");
    close(fd);

    off_t big = 5LL << 30;
    char buf[8] = {0};
    fd = open(P("large"), O_CREAT | O_RDWR, 0644);
    ssize_t w = pwrite(fd, "END", 3, big);
    fstat(fd, &st);
    close(fd);
    fd = open(P("large"), O_RDONLY);
    ssize_t r = pread(fd, buf, 3, big);
    off_t end = lseek(fd, 0, SEEK_END);
    emit("large.file_over_4GiB", "write=%s size=%lld read=%s seek_end=%lld",
         w == 3 ? "ok" : ename(errno), (long long)st.st_size, r == 3 ? buf : ename(errno),
         (long long)end);
    close(fd);
    unlink(P("large"));
}

static void check_times(void)
{
    struct stat st;
    setup_file(P("times"), "x", 0644, 0, 0);
    struct timespec ts[2] = {{1000000000, 123456789}, {1500000000, 987654321}};
    int r = utimensat(AT_FDCWD, P("times"), ts, 0);
    stat(P("times"), &st);
    emit("times.set_exact", "%s atime=%s mtime=%s", rc(r),
         st.st_atim.tv_sec == ts[0].tv_sec && st.st_atim.tv_nsec == ts[0].tv_nsec ? "exact"
                                                                                   : "differs",
         st.st_mtim.tv_sec == ts[1].tv_sec && st.st_mtim.tv_nsec == ts[1].tv_nsec ? "exact"
                                                                                   : "differs");

    time_t now = time(NULL);
    struct stat before;
    stat(P("times"), &before);
    int fd = open(P("times"), O_WRONLY | O_APPEND);
    write(fd, "y", 1);
    close(fd);
    stat(P("times"), &st);
    int mtime_now = st.st_mtim.tv_sec >= now - 60 && st.st_mtim.tv_sec <= now + 60;
    int ctime_now = st.st_ctim.tv_sec >= now - 60 && st.st_ctim.tv_sec <= now + 60;
    struct timespec ctime_before = st.st_ctim;
    usleep(20000);
    chmod(P("times"), 0600);
    stat(P("times"), &st);
    int ctime_moved = st.st_ctim.tv_sec > ctime_before.tv_sec ||
                      (st.st_ctim.tv_sec == ctime_before.tv_sec &&
                       st.st_ctim.tv_nsec > ctime_before.tv_nsec);
    emit("times.updated_by_changes", "write-sets-mtime=%s write-sets-ctime=%s chmod-moves-ctime=%s",
         mtime_now ? "now" : "stale", ctime_now ? "now" : "stale", ctime_moved ? "yes" : "no");

    r = utimensat(AT_FDCWD, P("times"), NULL, 0);
    stat(P("times"), &st);
    emit("times.utime_now", "%s mtime-now=%s", rc(r),
         st.st_mtim.tv_sec >= now - 60 && st.st_mtim.tv_sec <= now + 60 ? "yes" : "no");
}

/* -- locks ------------------------------------------------------------------------------ */

static void on_alarm(int sig)
{
    (void)sig;
}

static int take_lock(int fd, const char *kind, int blocking, int type)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET};
    if (!strcmp(kind, "flock")) {
        int op = type == F_UNLCK ? LOCK_UN : (type == F_RDLCK ? LOCK_SH : LOCK_EX);
        return flock(fd, op | (blocking ? 0 : LOCK_NB));
    }
    if (!strcmp(kind, "posix")) {
        return fcntl(fd, blocking ? F_SETLKW : F_SETLK, &fl);
    }
    return fcntl(fd, blocking ? F_OFD_SETLKW : F_OFD_SETLK, &fl);
}

static long elapsed_ms(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) * 1000 + (t1.tv_nsec - t0->tv_nsec) / 1000000;
}

/* Two processes of this container on one file: the second is refused, then waits. */
static void check_local_locks(void)
{
    static const char *kinds[] = {"flock", "posix", "ofd"};
    for (int i = 0; i < 3; i++) {
        const char *kind = kinds[i];
        char name[64];
        snprintf(name, sizeof(name), "lock.%s_between_two_processes", kind);
        int fd = open(P("lockfile"), O_CREAT | O_RDWR, 0644);
        int held = take_lock(fd, kind, 0, F_WRLCK);
        int pipefd[2];
        pipe(pipefd);
        memset(shared_result, 0, RESULT_MAX);
        pid_t pid = fork();
        if (pid == 0) {
            close(pipefd[1]);
            int cfd = open(P("lockfile"), O_RDWR);
            int r = take_lock(cfd, kind, 0, F_WRLCK);
            const char *nb = rc(r);
            char go;
            read(pipefd[0], &go, 1); /* the parent releases after this */
            struct sigaction sa = {.sa_handler = on_alarm};
            sigaction(SIGALRM, &sa, NULL);
            alarm(20);
            r = take_lock(cfd, kind, 1, F_WRLCK);
            snprintf(shared_result, RESULT_MAX, "try=%s wait=%s", nb,
                     r < 0 ? (errno == EINTR ? "timeout" : ename(errno)) : "acquired");
            _exit(0);
        }
        close(pipefd[0]);
        usleep(300000); /* let the child's try happen while we hold the lock */
        write(pipefd[1], "g", 1);
        usleep(200000); /* let it block (or fail) before we release */
        take_lock(fd, kind, 0, F_UNLCK);
        close(fd);
        waitpid(pid, NULL, 0);
        close(pipefd[1]);
        emit(name, "hold=%s %s", rc(held), shared_result);
        unlink(P("lockfile"));
    }
}

static int lock_command(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: fscheck lock flock|posix|ofd|all try|wait|hold FILE [SECONDS]\n");
        return 2;
    }
    static const char *all[] = {"flock", "posix", "ofd"};
    const char *mode = argv[3];
    int seconds = argc > 5 ? atoi(argv[5]) : 10;
    int each = !strcmp(argv[2], "all"); /* every kind, each on FILE.KIND */
    int count = each ? 3 : 1, held = 0;
    struct sigaction sa = {.sa_handler = on_alarm};
    sigaction(SIGALRM, &sa, NULL);
    for (int i = 0; i < count; i++) {
        const char *kind = each ? all[i] : argv[2];
        char file[4096];
        snprintf(file, sizeof(file), each ? "%s.%s" : "%s", argv[4], kind);
        int fd = open(file, O_CREAT | O_RDWR, 0666);
        if (fd < 0) {
            die(file);
        }
        int blocking = !strcmp(mode, "wait"); /* hold takes a free lock: non-blocking */
        if (blocking) {
            alarm(seconds);
        }
        struct timespec t0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int r = take_lock(fd, kind, blocking, F_WRLCK);
        const char *result = r < 0 ? (errno == EINTR ? "timeout" : ename(errno)) : "acquired";
        alarm(0);
        printf("{\"lock\": \"%s\", \"mode\": \"%s\", \"result\": \"%s\", \"waited_ms\": %ld}\n",
               kind, mode, result, elapsed_ms(&t0));
        fflush(stdout);
        held += r == 0;
        if (strcmp(mode, "hold")) {
            close(fd); /* try/wait: release at once */
        }
    }
    if (!strcmp(mode, "hold") && held) {
        char buf[64];
        alarm(seconds);
        while (read(0, buf, sizeof(buf)) > 0) {
        }
    }
    return 0;
}

static int bench_command(const char *where)
{
    char path[4096];
    struct timespec t0;
    if (mkdir(where, 0755) < 0) {
        die(where);
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 500; i++) {
        snprintf(path, sizeof(path), "%s/f%d", where, i);
        int fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0644);
        if (fd < 0 || write(fd, "x", 1) != 1) {
            die(path);
        }
        close(fd);
    }
    long create_ms = elapsed_ms(&t0);

    static char chunk[1 << 20];
    memset(chunk, 'w', sizeof(chunk));
    snprintf(path, sizeof(path), "%s/appended", where);
    int fd = open(path, O_CREAT | O_WRONLY | O_APPEND, 0644);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 2000; i++) {
        if (write(fd, chunk, 100) != 100) {
            die(path);
        }
    }
    close(fd);
    long append_ms = elapsed_ms(&t0);

    snprintf(path, sizeof(path), "%s/sequential", where);
    fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 64; i++) {
        if (write(fd, chunk, sizeof(chunk)) != (ssize_t)sizeof(chunk)) {
            die(path);
        }
    }
    fsync(fd);
    close(fd);
    long write_ms = elapsed_ms(&t0);
    printf("{\"create_ms\": %ld, \"append_ms\": %ld, \"write_ms\": %ld}\n", create_ms,
           append_ms, write_ms);
    return 0;
}

static int watch_command(const char *where, int seconds)
{
    int in = inotify_init1(0);
    if (in < 0 || inotify_add_watch(in, where, IN_CREATE | IN_MODIFY | IN_DELETE | IN_ATTRIB) < 0) {
        die(where);
    }
    struct sigaction sa = {.sa_handler = on_alarm};
    sigaction(SIGALRM, &sa, NULL);
    alarm(seconds);
    printf("watching\n");
    fflush(stdout);
    char buf[4096] __attribute__((aligned(8)));
    ssize_t n;
    while ((n = read(in, buf, sizeof(buf))) > 0) {
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)p;
            printf("%s:%s\n",
                   e->mask & IN_CREATE   ? "create"
                   : e->mask & IN_MODIFY ? "modify"
                   : e->mask & IN_DELETE ? "delete"
                                         : "attrib",
                   e->len ? e->name : "");
            p += sizeof(*e) + e->len;
        }
        fflush(stdout);
    }
    return 0;
}

static int connect_command(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path);
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        printf("%s\n", ename(errno));
        return 0;
    }
    write(c, "ping", 4);
    printf("connected\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "watch")) {
        return watch_command(argv[2], atoi(argv[3]));
    }
    if (argc == 3 && !strcmp(argv[1], "connect")) {
        return connect_command(argv[2]);
    }
    if (argc >= 2 && !strcmp(argv[1], "lock")) {
        return lock_command(argc, argv);
    }
    if (argc == 3 && !strcmp(argv[1], "bench")) {
        return bench_command(argv[2]);
    }
    if (argc != 3 || strcmp(argv[1], "suite")) {
        fprintf(stderr, "usage: fscheck suite DIR | fscheck lock KIND MODE FILE [SECONDS]\n");
        return 2;
    }
    snprintf(dir, sizeof(dir), "%s", argv[2]);
    if (mkdir(dir, 0755) < 0) {
        die(dir);
    }
    shared_result = mmap(NULL, RESULT_MAX, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (shared_result == MAP_FAILED) {
        die("mmap");
    }
    umask(022);
    check_permissions();
    check_links();
    check_rename_unlink();
    check_append_direct_tmpfile();
    check_mmap();
    check_truncate_sync_fallocate();
    check_xattrs();
    check_special_files();
    check_inotify();
    check_sparse_large();
    check_times();
    check_local_locks();
    return 0;
}
