# The system boundary of the data path: every system call the workers make is
# declared here, once.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        EINPROGRESS
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM
        ECONNABORTED
        EPROTO
        EPERM
        EINVAL
        EADDRNOTAVAIL
        EADDRINUSE
        EAFNOSUPPORT


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    int close(int fd)
    int getpid()
    int getppid()


cdef extern from "<fcntl.h>" nogil:
    int open "open"(const char *path, int flags, ...)
    enum:
        O_RDWR
        O_NONBLOCK
        O_CLOEXEC
        F_SETPIPE_SZ
    int pipe2(int *fds, int flags)
    int fcntl(int fd, int cmd, ...)
    ssize_t splice(int fd_in, void *off_in, int fd_out, void *off_out,
                   size_t length, unsigned int flags)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET


cdef extern from "<netinet/in.h>" nogil:
    ctypedef uint32_t in_addr_t
    ctypedef uint16_t in_port_t

    cdef struct in_addr:
        in_addr_t s_addr

    cdef struct sockaddr_in:
        unsigned short sin_family
        in_port_t sin_port
        in_addr sin_addr

    enum:
        IPPROTO_TCP
        IPPROTO_IP
        IP_BIND_ADDRESS_NO_PORT   # bind a source address now, its port at connect (no port held per bind)


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    cdef struct sockaddr:
        unsigned short sa_family

    cdef struct linger:
        int l_onoff
        int l_linger

    enum:
        AF_INET
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_REUSEADDR
        SO_REUSEPORT
        SO_ERROR
        SO_LINGER
        SHUT_WR
        SHUT_RDWR

    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int listen(int fd, int backlog)
    int accept4(int fd, sockaddr *addr, socklen_t *len, int flags)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)


cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)


cdef extern from "<linux/sockios.h>" nogil:
    enum:
        SIOCOUTQ                  # bytes in a socket's send queue, not yet acknowledged


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    cdef struct timespec:
        time_t tv_sec
        long tv_nsec

    enum:
        CLOCK_MONOTONIC_COARSE
    int clock_gettime(int clk, timespec *ts)


cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    int sigemptyset(sigset_t *s)
    int sigaddset(sigset_t *s, int signo)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)
    ctypedef void (*sighandler_t)(int)
    sighandler_t SIG_IGN
    sighandler_t signal(int signo, sighandler_t handler)
    enum:
        SIG_BLOCK
        SIGTERM
        SIGINT
        SIGPIPE
        SIGHUP
        SIGUSR1


cdef extern from "<sys/signalfd.h>" nogil:
    cdef struct signalfd_siginfo:
        uint32_t ssi_signo
    int signalfd(int fd, const sigset_t *mask, int flags)
    enum:
        SFD_NONBLOCK
        SFD_CLOEXEC


cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5)
    enum:
        PR_SET_PDEATHSIG


cdef extern from "<stdlib.h>" nogil:
    void *calloc(size_t n, size_t size)
    void free(void *p)
