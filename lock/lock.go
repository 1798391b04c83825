// stand-in; replaced by the real package at merge

// Package lock (stand-in) offers PostgreSQL session advisory locks held on a
// dedicated connection. Only the API the everyday commands use is here.
package lock

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrHeld means another session holds the lock.
var ErrHeld = errors.New("the advisory lock is held by another session")

// ErrLost means the connection holding the lock went away.
var ErrLost = errors.New("the advisory lock was lost (its connection ended)")

// HeldError says which lock was held after the wait.
type HeldError struct {
	Name string
	Key  int64
}

func (e *HeldError) Error() string {
	return fmt.Sprintf("lock %q (key %d): %v", e.Name, e.Key, ErrHeld)
}

// Is makes errors.Is(err, ErrHeld) true.
func (e *HeldError) Is(target error) bool { return target == ErrHeld }

// KeyFor maps a lock name to an advisory lock key.
func KeyFor(name string) int64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte("shadowctl:" + name))
	return int64(h.Sum64())
}

// Lock is a held session advisory lock.
type Lock struct {
	mu     sync.Mutex
	conn   *pgx.Conn
	key    int64
	lost   chan struct{}
	err    error
	stop   chan struct{}
	done   chan struct{}
	closed bool
}

// Acquire takes the lock named name, trying for at most wait.
func Acquire(ctx context.Context, cfg *pgx.ConnConfig, name string, wait time.Duration) (*Lock, error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("lock %q: connect: %w", name, err)
	}
	key := KeyFor(name)
	deadline := time.Now().Add(wait)
	for {
		var ok bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, key).Scan(&ok); err != nil {
			conn.Close(context.Background())
			return nil, fmt.Errorf("lock %q: %w", name, err)
		}
		if ok {
			break
		}
		if !time.Now().Before(deadline) {
			conn.Close(context.Background())
			return nil, &HeldError{Name: name, Key: key}
		}
		t := time.NewTimer(min(200*time.Millisecond, time.Until(deadline)))
		select {
		case <-ctx.Done():
			t.Stop()
			conn.Close(context.Background())
			return nil, ctx.Err()
		case <-t.C:
		}
	}
	l := &Lock{conn: conn, key: key, lost: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go l.watch()
	return l, nil
}

func (l *Lock) watch() {
	defer close(l.done)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		l.mu.Lock()
		err := l.conn.Ping(context.Background())
		if err != nil {
			l.err = fmt.Errorf("%w: %v", ErrLost, err)
			close(l.lost)
			l.mu.Unlock()
			return
		}
		l.mu.Unlock()
	}
}

// Lost is closed when the lock's connection is found dead.
func (l *Lock) Lost() <-chan struct{} { return l.lost }

// Err is ErrLost (wrapped) once Lost is closed, else nil.
func (l *Lock) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// Release unlocks and closes the connection.
func (l *Lock) Release(ctx context.Context) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	_, err := l.conn.Exec(ctx, `SELECT pg_advisory_unlock($1)`, l.key)
	cerr := l.conn.Close(ctx)
	if err != nil {
		return fmt.Errorf("lock release: %w", err)
	}
	return cerr
}
