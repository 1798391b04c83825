// Package lock: stand-in with the agreed API; replaced by the real package at merge.
package lock

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

var (
	ErrHeld = errors.New("lock held by another session")
	ErrLost = errors.New("lock lost")
)

func KeyFor(name string) int64 {
	s := sha256.Sum256([]byte("shadowctl:" + name))
	return int64(binary.BigEndian.Uint64(s[:8]))
}

type Lock struct {
	conn *pgx.Conn
	lost chan struct{}
	done chan struct{}
}

func Acquire(ctx context.Context, cfg *pgx.ConnConfig, name string, wait time.Duration) (*Lock, error) {
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	for {
		var ok bool
		if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", KeyFor(name)).Scan(&ok); err != nil {
			conn.Close(context.Background())
			return nil, err
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			conn.Close(context.Background())
			return nil, fmt.Errorf("%s: %w", name, ErrHeld)
		}
		select {
		case <-ctx.Done():
			conn.Close(context.Background())
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	l := &Lock{conn: conn, lost: make(chan struct{}), done: make(chan struct{})}
	return l, nil
}

func (l *Lock) Lost() <-chan struct{} { return l.lost }

func (l *Lock) Release(ctx context.Context) error {
	select {
	case <-l.done:
		return nil
	default:
		close(l.done)
	}
	return l.conn.Close(ctx)
}
