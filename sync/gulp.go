package sync

// This file: reading the replication stream in gulps.
//
// At the tip of the stream the WAL sender sends each message as soon as it
// has decoded it: a few hundred bytes per upstream transaction. A reader
// that waits on the socket is woken for every one of them (in a Go process:
// the netpoller, a thread, the scheduler), and at 1,000 upstream
// transactions a second those wake-ups cost more CPU than decoding and
// applying the changes — CPU taken from the application on a small machine
// (measured in docs/logical.md, "Throughput"). Sleeping between reads does
// not help: the netpoller is still woken for every packet.
//
// So while the stream is busy, the socket's receive low-water mark
// (SO_RCVLOWAT) is raised: the kernel wakes the reader only once gulpBytes
// have arrived, or when readPause has passed since the read began, whichever
// is first. A quiet stream is read as it comes (the mark is back at one
// byte), and so is everything for a while after an urgent marker (a
// cutover waits on it, the application held back meanwhile). A backlog is
// read as fast as ever: the mark is reached at once.

import (
	"context"
	"errors"
	"net"
	"os"
	gosync "sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// readPause bounds how long data waits in the socket while the stream
	// is busy: the lag the gulping adds at the tip.
	readPause = 20 * time.Millisecond
	// gulpBytes is the low-water mark while busy (pgconn reads 8 KiB at a
	// time; a wake-up then serves about 100 small upstream transactions).
	gulpBytes = 8 << 10
	// recvBuffer caps the socket's receive buffer. Left to autotuning it
	// grows to megabytes, and when the apply rests (Applier.Pace) the WAL
	// sender fills it with the backlog's changes while it races through
	// the rows the copy wrote; capped, it stops at the next change it cannot
	// send, so the pace holds back its decoding too. 256 KiB still drains a
	// backlog faster than green applies it, on a LAN or loopback.
	recvBuffer = 256 << 10
	// eagerAfterMarker: how long reads stay immediate (and the apply unpaced)
	// after an urgent marker: long enough for a swap retrying its lock.
	eagerAfterMarker = 30 * time.Second
)

// gulpConn is the replication connection's socket, read in gulps while the
// stream is busy. Read is called by one goroutine at a time (pgconn's);
// deadlines may be set from others.
type gulpConn struct {
	net.Conn
	raw   syscall.RawConn
	pause time.Duration

	mu       gosync.Mutex
	deadline time.Time // the caller's read deadline

	eagerUntil *atomic.Int64 // unix nanos: reads immediate until then (set by the applier)
	busy       bool          // the mark is at gulpBytes
	lastRead   time.Time
}

func (c *gulpConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetReadDeadline(t)
}

func (c *gulpConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	c.deadline = t
	c.mu.Unlock()
	return c.Conn.SetDeadline(t)
}

func (c *gulpConn) callerDeadline() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.deadline
}

func (c *gulpConn) Read(p []byte) (int, error) {
	now := time.Now()
	eager := now.UnixNano() < c.eagerUntil.Load()
	if c.busy && eager {
		c.setBusy(false)
	}
	if !c.busy {
		n, err := c.Conn.Read(p)
		t := time.Now()
		// Reads that follow each other closely: the stream is busy.
		if err == nil && !eager && t.Sub(c.lastRead) < c.pause {
			c.setBusy(true)
		}
		c.lastRead = t
		return n, err
	}
	// Busy: wake on a gulp, or when the pause is over.
	caller := c.callerDeadline()
	wait := now.Add(c.pause)
	if !caller.IsZero() && caller.Before(wait) {
		wait = caller
	}
	_ = c.Conn.SetReadDeadline(wait)
	n, err := c.Conn.Read(p)
	_ = c.Conn.SetReadDeadline(c.callerDeadline())
	if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
		c.lastRead = time.Now()
		return n, err
	}
	if caller = c.callerDeadline(); !caller.IsZero() && !time.Now().Before(caller) {
		return n, err // the caller's own deadline
	}
	// Less than a gulp came within the pause: take it, and stay busy only
	// if there was some.
	c.setBusy(false)
	before := time.Now()
	n, err = c.Conn.Read(p)
	c.lastRead = time.Now()
	if err == nil && c.lastRead.Sub(before) < time.Millisecond {
		c.setBusy(true)
	}
	return n, err
}

// setBusy moves the low-water mark. Where the socket has none (or the
// platform), reads simply stay immediate.
func (c *gulpConn) setBusy(busy bool) {
	if c.raw == nil || busy == c.busy {
		return
	}
	mark := 1
	if busy {
		mark = gulpBytes
	}
	if err := setRcvLowat(c.raw, mark); err != nil {
		c.raw = nil
		return
	}
	c.busy = busy
}

// gulping returns a copy of cfg whose connections read in gulps, and
// immediately until the time in eagerUntil.
func gulping(cfg *pgconn.Config, pause time.Duration, eagerUntil *atomic.Int64) *pgconn.Config {
	c := cfg.Copy()
	dial := c.DialFunc
	c.DialFunc = func(ctx context.Context, network, addr string) (net.Conn, error) {
		nc, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		g := &gulpConn{Conn: nc, pause: pause, eagerUntil: eagerUntil}
		// TCP only: a Unix socket's poll ignores the low-water mark.
		if tc, ok := nc.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(recvBuffer)
			if raw, err := tc.SyscallConn(); err == nil {
				g.raw = raw
			}
		}
		return g, nil
	}
	return c
}
