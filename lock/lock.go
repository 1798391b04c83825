// Package lock owns shadowctl's PostgreSQL session-level advisory locks: one
// migration per table, one driver per migration, and the `shadowctl lock`
// wrapper that serialises other migration tools. It does not know what a lock
// protects; callers pick the name.
//
// # Keys
//
// A lock has a name; the advisory-lock key is derived from it by KeyFor:
// the first 8 bytes, read big-endian as a signed int64, of
// SHA-256("shadowctl:" + name). This derivation is part of the interface and
// will not change, so other tools can take or inspect the same lock, e.g. in
// SQL:
//
//	SELECT ('x' || left(encode(sha256('shadowctl:migrations'), 'hex'), 16))::bit(64)::bigint;
//
// The key is used with the one-argument (bigint) forms pg_advisory_lock(key)
// etc., which pg_locks shows as locktype 'advisory', classid = high 32 bits,
// objid = low 32 bits, objsubid = 1. Advisory locks are per database.
//
// # Connections
//
// Each Lock has its own dedicated connection, opened by Acquire from a
// *pgx.ConnConfig (never a pooled one): a session-level advisory lock belongs
// to the server session, and ends with it. While the lock is held nothing is
// sent on that connection; a goroutine reads from it so that a server-side
// termination (pg_terminate_backend, server shutdown, a proxy closing the
// socket) is noticed at once: Lost() is closed and Err() wraps ErrLost.
// Silent network failures are caught by TCP keepalives (client side: probes
// after 5s idle, every 2s, 3 tries; server side: tcp_keepalives_* set to
// 10s/5s/3 on the session, so the server drops a vanished client and its
// lock). idle_session_timeout is switched off for the session where the
// server has it.
//
// # Waiting
//
// Acquire first tries pg_try_advisory_lock. If that fails and it may wait, it
// queues with pg_advisory_lock inside a transaction whose lock_timeout is the
// time left (statement_timeout 0), so it never stays in the lock queue longer
// than asked, is served in arrival order, and is granted the moment the
// holder's session ends. The lock stays held after that transaction commits
// (session-level locks ignore transaction boundaries). On timeout Acquire
// returns a *HeldError naming the holders (errors.Is(err, ErrHeld)).
// Cancelling ctx while waiting sends a cancel request to the server (so no
// ghost waiter stays queued), closes the connection and returns ctx.Err().
//
// # Lifetime: release on context cancel
//
// The Lock returned by Acquire is tied to the ctx given to Acquire: when that
// ctx is done, the lock releases itself (unlock, close the connection) and
// Err() then wraps ErrReleased and ctx.Err(). Pass a context that lives as long
// as the protected work (or context.WithoutCancel) if the lock must outlive a
// request. Release releases it earlier; it is idempotent. Lost() is closed
// only when the lock is lost (connection death), not on Release or ctx cancel.
//
// # Poolers
//
// Advisory locks need a direct session. Through a transaction-pooling proxy
// (pgbouncer pool_mode=transaction or statement) the lock is taken by whatever
// server session served that one statement, and later statements, the unlock
// and the disconnect go elsewhere: the lock leaks to another client and
// protects nothing. After taking the lock, Acquire checks in a separate
// statement that the serving backend (pg_backend_pid()) holds it; if not it
// fails with ErrPooler. This catches the obvious case (the proxy switched
// server sessions between statements); an idle transaction pool may happen to
// serve both statements from one session, so point shadowctl at PostgreSQL
// itself or at a session-mode pool. BackendPID() tells which server process
// holds the lock. CheckDirect runs the same check with a throwaway lock;
// submitting a migration calls it, so that a pooler is refused before the
// migration is recorded (TestStartRefusesATransactionPoolingProxy, with a
// test proxy that pools as pgbouncer does in transaction mode).
package lock

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Sentinel errors.
var (
	// ErrHeld: the lock is held by another session and did not become free
	// within the wait. The concrete error is a *HeldError.
	ErrHeld = errors.New("advisory lock is held by another session")
	// ErrLost: the lock's connection died (or the server terminated its
	// backend); the lock is no longer ours.
	ErrLost = errors.New("advisory lock lost: its connection is gone")
	// ErrReleased: the lock was released, by Release or because the context
	// given to Acquire ended.
	ErrReleased = errors.New("advisory lock released")
	// ErrPooler: the lock was taken by a server session other than the one now
	// serving this connection: a transaction-pooling proxy is in between.
	ErrPooler = errors.New("advisory lock taken through a transaction-pooling proxy (e.g. pgbouncer pool_mode=transaction): " +
		"connect directly to PostgreSQL or through a session-mode pool")
)

// KeyFor derives the advisory-lock key for a lock name: the first 8 bytes of
// SHA-256("shadowctl:"+name), big-endian, as int64. Stable forever.
func KeyFor(name string) int64 {
	sum := sha256.Sum256([]byte("shadowctl:" + name))
	return int64(binary.BigEndian.Uint64(sum[:8]))
}

// split returns the pg_locks classid and objid of a bigint advisory key.
func split(key int64) (classid, objid int64) {
	return int64(uint64(key) >> 32), int64(uint64(key) & 0xffffffff)
}

// Options tune AcquireWith.
type Options struct {
	// Wait is how long to wait for a held lock; 0 tries once.
	Wait time.Duration
	// Logger receives debug/info/warn messages; the zero value logs nothing.
	Logger zerolog.Logger
	// OnWait, if set, is called once with the current holders when the lock
	// is found held and Acquire starts to wait (Wait > 0).
	OnWait func(holders []Holder)
}

// Lock is a held session-level advisory lock on its own connection.
type Lock struct {
	name       string
	key        int64
	backendPID int32
	conn       *pgx.Conn
	log        zerolog.Logger

	mu   sync.Mutex
	err  error
	lost chan struct{}

	stopKeeper chan struct{}
	keeperDone chan struct{}
	stopCtx    func() bool // guarded by mu

	releaseOnce sync.Once
	releaseErr  error
}

// Acquire takes the lock called name on a new dedicated connection made from
// cfg, waiting up to wait for it (0: try once). See the package doc for the
// waiting strategy, the errors, and release on ctx cancel.
func Acquire(ctx context.Context, cfg *pgx.ConnConfig, name string, wait time.Duration) (*Lock, error) {
	return AcquireWith(ctx, cfg, name, Options{Wait: wait})
}

// maxLockTimeout is the largest lock_timeout PostgreSQL accepts (INT_MAX ms).
const maxLockTimeout = time.Duration(math.MaxInt32) * time.Millisecond

// AcquireWith is Acquire with options.
func AcquireWith(ctx context.Context, cfg *pgx.ConnConfig, name string, opts Options) (*Lock, error) {
	if cfg == nil {
		return nil, errors.New("lock: nil connection config")
	}
	if opts.Wait < 0 {
		return nil, fmt.Errorf("lock %q: negative wait %s", name, opts.Wait)
	}
	start := time.Now()
	key := KeyFor(name)
	log := opts.Logger.With().Str("lock", name).Int64("key", key).Logger()

	conn, err := dial(ctx, cfg, name)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*Lock, error) {
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = conn.Close(closeCtx)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}

	var got bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, key).Scan(&got); err != nil {
		return fail(fmt.Errorf("lock %q: try lock: %w", name, err))
	}
	if !got && opts.Wait > 0 {
		holders, err := Holders(ctx, conn, key)
		if err != nil {
			return fail(fmt.Errorf("lock %q: %w", name, err))
		}
		log.Info().Str("holders", describe(holders)).Str("wait", opts.Wait.String()).Msg("lock is held; waiting")
		if opts.OnWait != nil {
			opts.OnWait(holders)
		}
		for !got {
			left := opts.Wait - time.Since(start)
			if left < time.Millisecond {
				break
			}
			got, err = waitInQueue(ctx, conn, key, min(left, maxLockTimeout))
			if err != nil {
				return fail(fmt.Errorf("lock %q: wait: %w", name, err))
			}
		}
	}
	if !got {
		holders, err := Holders(ctx, conn, key)
		if err != nil {
			return fail(fmt.Errorf("lock %q is held; listing holders: %w", name, err))
		}
		return fail(&HeldError{Name: name, Key: key, Waited: time.Since(start), Holders: holders})
	}

	// A separate statement: through a transaction pool it may reach another
	// server session, which then does not hold the lock.
	var pid int32
	var ours bool
	classid, objid := split(key)
	if err := conn.QueryRow(ctx, `/* shadowctl lock */ SELECT pg_backend_pid(), EXISTS (
		SELECT 1 FROM pg_locks
		 WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
		   AND classid::int8 = $1 AND objid::int8 = $2 AND objsubid = 1 AND granted AND pid = pg_backend_pid())`,
		classid, objid).Scan(&pid, &ours); err != nil {
		return fail(fmt.Errorf("lock %q: confirm: %w", name, err))
	}
	if !ours {
		return fail(fmt.Errorf("lock %q: server process %d does not hold the lock it was just granted: %w", name, pid, ErrPooler))
	}
	if reported := conn.PgConn().PID(); uint32(pid) != reported {
		log.Warn().Int32("backend_pid", pid).Uint32("startup_pid", reported).
			Msg("the connection goes through a proxy; advisory locks are only safe through a session-mode pool")
	}

	l := &Lock{
		name: name, key: key, backendPID: pid, conn: conn, log: log,
		lost: make(chan struct{}), stopKeeper: make(chan struct{}), keeperDone: make(chan struct{}),
	}
	go l.keep()
	l.mu.Lock() // the AfterFunc may run (and read stopCtx) at once
	l.stopCtx = context.AfterFunc(ctx, func() {
		l.releaseOnce.Do(func() {
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			l.releaseErr = l.release(rctx, fmt.Errorf("%w: context ended: %w", ErrReleased, ctx.Err()))
		})
	})
	l.mu.Unlock()
	log.Debug().Int32("backend_pid", pid).Dur("waited", time.Since(start)).Msg("lock acquired")
	return l, nil
}

// dial opens the dedicated connection: cancel requests on ctx cancel, an
// informative application_name, keepalives, no idle_session_timeout.
func dial(ctx context.Context, cfg *pgx.ConnConfig, name string) (*pgx.Conn, error) {
	cfg = cfg.Copy()
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = truncate("shadowctl lock "+name, 63)
	}
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.CancelRequestContextWatcherHandler{Conn: pc, DeadlineDelay: 2 * time.Second}
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, pgsql.RedactError(fmt.Errorf("lock %q: connect to host=%s port=%d database=%s: %w",
			name, cfg.Host, cfg.Port, cfg.Database, err), cfg.ConnString())
	}
	if tcp := tcpConn(conn.PgConn().Conn()); tcp != nil {
		_ = tcp.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: 5 * time.Second, Interval: 2 * time.Second, Count: 3})
	}
	if _, err := conn.Exec(ctx, `SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3`); err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("lock %q: session settings: %w", name, err)
	}
	// PostgreSQL 14+: an idle lock session must not be timed out.
	if _, err := conn.Exec(ctx, `SET idle_session_timeout = 0`); err != nil && pgsql.Code(err) != "42704" {
		_ = conn.Close(context.WithoutCancel(ctx))
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("lock %q: session settings: %w", name, err)
	}
	return conn, nil
}

func tcpConn(c net.Conn) *net.TCPConn {
	for c != nil {
		switch v := c.(type) {
		case *net.TCPConn:
			return v
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// waitInQueue queues for the lock for at most timeout. got is false when
// lock_timeout expired.
func waitInQueue(ctx context.Context, conn *pgx.Conn, key int64, timeout time.Duration) (got bool, err error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer func() {
		if err != nil || !got {
			_ = tx.Rollback(context.WithoutCancel(ctx))
		}
	}()
	if err := pgsql.SetLocalLockTimeout(ctx, tx, timeout); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `SET LOCAL statement_timeout = 0`); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_lock($1)`, key); err != nil {
		if pgsql.IsLockTimeout(err) {
			return false, nil
		}
		return false, err
	}
	if err := tx.Commit(ctx); err != nil {
		return false, err
	}
	return true, nil
}

// keep reads the idle connection until Release stops it or it dies.
func (l *Lock) keep() {
	defer close(l.keeperDone)
	for {
		err := l.conn.PgConn().WaitForNotification(context.Background())
		select {
		case <-l.stopKeeper:
			return
		default:
		}
		if err == nil || pgconn.Timeout(err) {
			continue // a stray NOTIFY, or a deadline meant for someone else
		}
		l.markLost(err)
		return
	}
}

func (l *Lock) markLost(cause error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return
	}
	l.err = fmt.Errorf("%w: lock %q (key %d, server process %d): %s", ErrLost, l.name, l.key, l.backendPID, pgsql.Describe(cause))
	close(l.lost)
	l.log.Error().Err(l.err).Msg("advisory lock lost")
}

// Name is the lock's name.
func (l *Lock) Name() string { return l.name }

// Key is the advisory-lock key (KeyFor(Name())).
func (l *Lock) Key() int64 { return l.key }

// BackendPID is the PostgreSQL server process holding the lock.
func (l *Lock) BackendPID() int32 { return l.backendPID }

// Lost is closed when the lock's connection dies or the server terminates its
// backend (within a moment of the server closing it). It is not closed by
// Release or by the end of the Acquire context.
func (l *Lock) Lost() <-chan struct{} { return l.lost }

// Err is nil while the lock is held. After a loss it wraps ErrLost; after
// Release it is ErrReleased; after the Acquire context ended it wraps
// ErrReleased and the context's error.
func (l *Lock) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// CheckDirect fails with ErrPooler when cfg reaches PostgreSQL through a
// transaction-pooling proxy. It takes a lock of its own (a random name) and
// lets it go, so it proves what Acquire proves, with nobody waiting on it.
// Callers that are about to change something and then hold locks for a long
// time (submitting a migration) call it first, so that a refusal finds the
// database as it was.
func CheckDirect(ctx context.Context, cfg *pgx.ConnConfig) error {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	l, err := Acquire(ctx, cfg, "session-check:"+hex.EncodeToString(b[:]), 0)
	if errors.Is(err, ErrPooler) {
		return fmt.Errorf("the connection's statements do not all reach one server session: %w", ErrPooler)
	}
	if err != nil {
		return err
	}
	return l.Release(ctx)
}

// Release unlocks and closes the connection. It is idempotent: later calls
// return the first call's result. If the lock was already lost there is
// nothing to unlock and it returns nil (check Err for the loss). An error
// means the unlock could not be confirmed; the connection is closed anyway,
// which ends the session and with it the lock.
func (l *Lock) Release(ctx context.Context) error {
	l.releaseOnce.Do(func() { l.releaseErr = l.release(ctx, ErrReleased) })
	return l.releaseErr
}

func (l *Lock) release(ctx context.Context, reason error) error {
	l.mu.Lock()
	stop := l.stopCtx
	l.mu.Unlock()
	if stop != nil {
		stop()
	}
	close(l.stopKeeper)
	nc := l.conn.PgConn().Conn()
	_ = nc.SetReadDeadline(time.Now()) // wakes the keeper without closing
	<-l.keeperDone
	_ = nc.SetReadDeadline(time.Time{})

	l.mu.Lock()
	lost := l.err != nil
	if !lost {
		l.err = reason
	}
	l.mu.Unlock()
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = l.conn.Close(cctx)
	}()
	if lost {
		return nil
	}
	var unlocked bool
	if err := l.conn.QueryRow(ctx, `SELECT pg_advisory_unlock($1)`, l.key).Scan(&unlocked); err != nil {
		return fmt.Errorf("release lock %q: unlock (the connection is closed, which releases it too): %w", l.name, err)
	}
	if !unlocked {
		return fmt.Errorf("release lock %q: server process %d did not hold it: %w", l.name, l.backendPID, ErrLost)
	}
	l.log.Debug().Msg("lock released")
	return nil
}

// Holder is a session holding an advisory lock.
type Holder struct {
	PID             int32
	User            string
	ApplicationName string
	ClientAddr      string // "local" for a Unix socket, "" when not visible
	State           string
	Query           string // the holder's last statement ("<insufficient privilege>" for others' sessions unless privileged)
	BackendStart    time.Time
	// Since is when the lock was granted where that is known, otherwise when
	// the session started. PostgreSQL does not record grant times; for a
	// shadowctl lock connection (idle, last statement the lock confirmation)
	// the time of its last state change is the grant time (SinceGrant true).
	// For any other holder Since is BackendStart: the lock is no older.
	Since      time.Time
	SinceGrant bool
}

// String describes the holder for operators.
func (h Holder) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pid %d (", h.PID)
	var parts []string
	if h.ApplicationName != "" {
		parts = append(parts, fmt.Sprintf("application %q", h.ApplicationName))
	}
	if h.ClientAddr != "" {
		parts = append(parts, "client "+h.ClientAddr)
	}
	if h.User != "" {
		parts = append(parts, "user "+h.User)
	}
	if !h.BackendStart.IsZero() {
		parts = append(parts, "connected since "+h.BackendStart.UTC().Format(time.RFC3339))
	}
	if h.SinceGrant && !h.Since.IsZero() {
		parts = append(parts, fmt.Sprintf("holding since %s (%s)", h.Since.UTC().Format(time.RFC3339), time.Since(h.Since).Round(time.Second)))
	}
	if len(parts) == 0 {
		parts = append(parts, "no session details visible")
	}
	b.WriteString(strings.Join(parts, ", "))
	b.WriteString(")")
	return b.String()
}

func describe(hs []Holder) string {
	if len(hs) == 0 {
		return "another session (gone before it could be identified)"
	}
	s := make([]string, len(hs))
	for i, h := range hs {
		s[i] = h.String()
	}
	return strings.Join(s, "; ")
}

// HeldError is returned when the lock stayed held for the whole wait.
type HeldError struct {
	Name    string
	Key     int64
	Waited  time.Duration
	Holders []Holder
}

func (e *HeldError) Error() string {
	return fmt.Sprintf("lock %q (key %d) is held by %s; waited %s", e.Name, e.Key, describe(e.Holders), e.Waited.Round(time.Millisecond))
}

// Is makes errors.Is(err, ErrHeld) true.
func (e *HeldError) Is(target error) bool { return target == ErrHeld }

// Holders lists the sessions holding the advisory lock key in q's database
// (granted entries in pg_locks joined with pg_stat_activity), by pid.
func Holders(ctx context.Context, q pgsql.Querier, key int64) ([]Holder, error) {
	classid, objid := split(key)
	rows, err := q.Query(ctx, `
SELECT l.pid, coalesce(a.usename::text, ''), coalesce(a.application_name, ''),
       coalesce(host(a.client_addr), CASE WHEN a.client_port = -1 THEN 'local' ELSE '' END),
       coalesce(a.state, ''), coalesce(a.query, ''), a.backend_start,
       (a.state = 'idle' AND a.query LIKE '/* shadowctl lock */%'), a.state_change
  FROM pg_locks l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory'
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid::int8 = $1 AND l.objid::int8 = $2 AND l.objsubid = 1
   AND l.granted AND l.pid IS NOT NULL
 ORDER BY l.pid`, classid, objid)
	if err != nil {
		return nil, fmt.Errorf("list holders of advisory lock %d: %w", key, err)
	}
	var out []Holder
	for rows.Next() {
		var h Holder
		var start, change *time.Time
		var grant *bool
		if err := rows.Scan(&h.PID, &h.User, &h.ApplicationName, &h.ClientAddr, &h.State, &h.Query, &start, &grant, &change); err != nil {
			rows.Close()
			return nil, fmt.Errorf("list holders of advisory lock %d: %w", key, err)
		}
		if start != nil {
			h.BackendStart = *start
			h.Since = *start
		}
		if grant != nil && *grant && change != nil {
			h.Since, h.SinceGrant = *change, true
		}
		out = append(out, h)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list holders of advisory lock %d: %w", key, err)
	}
	return out, nil
}
