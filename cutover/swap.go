package cutover

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// ErrDeadline means the swap's lock was not granted before the deadline; the
// database is unchanged.
var ErrDeadline = errors.New("the swap could not take its lock before the deadline")

// ErrAmbiguousCommit means the connection failed while the swap committed:
// whether it took effect must be read from the database before anything else.
var ErrAmbiguousCommit = errors.New("the connection failed during the swap's commit")

// Blocker is a session holding a lock that the swap needs.
type Blocker struct {
	PID         int32      `json:"pid"`
	User        string     `json:"user"`
	Application string     `json:"application"`
	State       string     `json:"state"`
	XactStart   *time.Time `json:"xact_start,omitempty"`
	Query       string     `json:"query"`
	Canceled    bool       `json:"canceled,omitempty"`
	// Autovacuum is set for an autovacuum worker.
	Autovacuum bool `json:"autovacuum,omitempty"`
}

func (b Blocker) String() string {
	age := ""
	if b.XactStart != nil {
		age = fmt.Sprintf(", transaction open %s", time.Since(*b.XactStart).Round(time.Millisecond))
	}
	return fmt.Sprintf("pid %d (%s, %s, %s%s): %s", b.PID, b.User, b.Application, b.State, age, oneLine(b.Query, 80))
}

// Attempt is one try at the swap's lock.
type Attempt struct {
	No       int           `json:"no"`
	At       time.Time     `json:"at"`
	LockWait time.Duration `json:"lock_wait_ns"`
	Err      string        `json:"error,omitempty"`
	Blockers []Blocker     `json:"blockers,omitempty"`
}

// SwapOptions bound a swap.
type SwapOptions struct {
	// LockTimeout is the longest the swap sits in a lock queue (and so the
	// longest it can stall the application) per attempt.
	LockTimeout time.Duration
	// Deadline is when to give up retrying (zero: 5 minutes from now).
	Deadline time.Time
	// CancelBlockersAfter, when positive, cancels (or, when idle in a
	// transaction, terminates) the sessions blocking the swap once this much
	// time has passed since the first attempt. Only on the operator's word.
	CancelBlockersAfter time.Duration
	// OnAttempt is told about each failed attempt.
	OnAttempt func(Attempt)
	// BeforeCommit, when set, runs just before COMMIT (tests inject a lost
	// connection there).
	BeforeCommit func(ctx context.Context, tx pgx.Tx) error
	// Retryable, when set, marks more errors of the body as worth another
	// attempt (besides lock timeouts, deadlocks and serialization failures).
	Retryable func(error) bool
	// Guarded relations are locked first, in SHARE UPDATE EXCLUSIVE mode:
	// their writers go on, while autovacuum and DDL stay off them until the
	// swap ends. For a relation the body locks fully later (green in
	// logical sync, after the stream has drained into it): an autovacuum
	// there would make that lock wait while blue's is held, the application
	// waiting with it; met here, it only delays the attempt, and a retry
	// cancels it.
	Guarded []pgsql.QualifiedName
	// AsyncCommit commits without waiting for the WAL flush, so the locks
	// are released as soon as the commit record is written: the flush
	// (an fsync, 10–100 ms on a busy disk) is not spent holding the
	// application back. The caller must make the swap durable before it
	// reports success, by committing any write with synchronous_commit on
	// after Swap returns: that flush covers the WAL before it, the swap's
	// commit included. Until then, no application write that saw the swap
	// can be durable without it either (its own commit flushes the WAL
	// through the swap's), so a crash can undo the swap but never split it
	// from what followed.
	AsyncCommit bool
	Log         zerolog.Logger
}

// SwapResult measures a successful swap.
type SwapResult struct {
	Attempts int           `json:"attempts"`
	LockWait time.Duration `json:"lock_wait_ns"`
	LockHold time.Duration `json:"lock_hold_ns"`
	// Commit is the part of LockHold spent in COMMIT.
	Commit time.Duration `json:"commit_ns"`
	// AfterCommitLSN is the WAL insert position read just after the commit
	// (at or past the commit record's end): the WAL must be flushed this
	// far before the swap is durable. Empty when it could not be read.
	AfterCommitLSN string `json:"after_commit_lsn,omitempty"`
	// queuedAt is the server's clock just before the attempt asked for its
	// first lock (zero when it never got that far).
	queuedAt time.Time
}

// Swap runs body in one transaction after taking the locks on relations, all
// of them within LockTimeout. When a lock is not granted in time the
// transaction is rolled back, the blockers are reported, and it retries with
// backoff and jitter until the deadline. Lock wait is the time spent in the LOCK
// statements of the successful attempt; lock hold is from their end to the
// end of COMMIT.
func Swap(ctx context.Context, pool *pgxpool.Pool, relations []pgsql.QualifiedName, body func(ctx context.Context, tx pgx.Tx) error, opts SwapOptions) (SwapResult, error) {
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = 100 * time.Millisecond
	}
	if opts.Deadline.IsZero() {
		opts.Deadline = time.Now().Add(5 * time.Minute)
	}
	first := time.Now()
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return SwapResult{}, err
	}
	defer conn.Release()
	for attempt := 1; ; attempt++ {
		res, err := swapOnce(ctx, conn.Conn(), relations, body, opts)
		res.Attempts = attempt
		if err == nil {
			return res, nil
		}
		if errors.Is(err, ErrAmbiguousCommit) {
			// A connection whose COMMIT had no answer is not to be trusted
			// (nor handed to the next caller, who would find it dead when
			// reading what the database serves): close it, and the pool
			// drops it on release.
			closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			_ = conn.Conn().Close(closeCtx)
			cancel()
			return res, err
		}
		if !(pgsql.IsRetryable(err) || (opts.Retryable != nil && opts.Retryable(err))) {
			return res, err
		}
		a := Attempt{No: attempt, At: time.Now(), LockWait: res.LockWait, Err: pgsql.Describe(err)}
		a.Blockers, _ = blockers(ctx, pool, relations, res.queuedAt)
		if opts.CancelBlockersAfter > 0 && time.Since(first) >= opts.CancelBlockersAfter {
			cancelBlockers(ctx, pool, a.Blockers, opts.Log)
		} else {
			cancelAutovacuum(ctx, pool, a.Blockers, opts.Log)
		}
		if opts.OnAttempt != nil {
			opts.OnAttempt(a)
		}
		opts.Log.Info().Int("attempt", attempt).Int("blockers", len(a.Blockers)).Msg("swap lock not granted in time; retrying")
		if time.Now().After(opts.Deadline) {
			return res, fmt.Errorf("%w (%d attempts, last blocked by %v)", ErrDeadline, attempt, a.Blockers)
		}
		wait := min(50*time.Millisecond<<min(attempt-1, 6), 2*time.Second)
		wait = wait/2 + time.Duration(rand.Int64N(int64(wait/2)+1))
		if until := time.Until(opts.Deadline); wait > until {
			wait = max(until, 0)
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return res, ctx.Err()
		}
	}
}

func swapOnce(ctx context.Context, conn *pgx.Conn, relations []pgsql.QualifiedName, body func(ctx context.Context, tx pgx.Tx) error, opts SwapOptions) (SwapResult, error) {
	var res SwapResult
	tx, err := conn.Begin(ctx)
	if err != nil {
		return res, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if err := pgsql.SetLocalLockTimeout(ctx, tx, opts.LockTimeout); err != nil {
		return res, err
	}
	if opts.AsyncCommit { // set now: under the lock every round trip counts
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = off"); err != nil {
			return res, err
		}
	}
	if err := tx.QueryRow(ctx, "SELECT clock_timestamp()").Scan(&res.queuedAt); err != nil {
		return res, err
	}
	lockStart := time.Now()
	type lock struct {
		rel  pgsql.QualifiedName
		mode string
	}
	var locks []lock
	for _, rel := range opts.Guarded {
		locks = append(locks, lock{rel, "SHARE UPDATE EXCLUSIVE"})
	}
	for _, rel := range relations {
		locks = append(locks, lock{rel, "ACCESS EXCLUSIVE"})
	}
	for i, l := range locks {
		// One budget for all the LOCKs: while waiting for a later relation
		// the swap already holds the earlier ones, and the application
		// queues behind it. (What is left also bounds the body's own locks.)
		if i > 0 {
			if err := pgsql.SetLocalLockTimeout(ctx, tx, opts.LockTimeout-time.Since(lockStart)); err != nil {
				return res, err
			}
		}
		if _, err := tx.Exec(ctx, "LOCK TABLE "+l.rel.Quoted()+" IN "+l.mode+" MODE"); err != nil {
			res.LockWait = time.Since(lockStart)
			return res, fmt.Errorf("lock %s: %w", l.rel, err)
		}
	}
	granted := time.Now()
	res.LockWait = granted.Sub(lockStart)
	if err := body(ctx, tx); err != nil {
		return res, err
	}
	if opts.BeforeCommit != nil {
		if err := opts.BeforeCommit(ctx, tx); err != nil {
			return res, fmt.Errorf("%w: %v", ErrAmbiguousCommit, err)
		}
	}
	committing := time.Now()
	if err := tx.Commit(ctx); err != nil {
		if connectionLost(err) { // no answer to the COMMIT itself: outcome unknown
			return res, fmt.Errorf("%w: %v", ErrAmbiguousCommit, err)
		}
		return res, err
	}
	res.LockHold = time.Since(granted)
	res.Commit = time.Since(committing)
	_ = conn.QueryRow(ctx, "SELECT pg_current_wal_insert_lsn()::text").Scan(&res.AfterCommitLSN)
	return res, nil
}

// connectionLost reports an error that ends the session rather than
// answering the statement: no SQLSTATE at all (I/O error, closed
// connection), a FATAL or PANIC (e.g. 57P01, the backend was terminated:
// it may come after the commit took effect), or a connection exception
// (class 08).
func connectionLost(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return true
	}
	return pgErr.Severity == "FATAL" || pgErr.Severity == "PANIC" || strings.HasPrefix(pgErr.Code, "08")
}

// blockers lists the sessions holding locks on the relations whose
// transaction began before the attempt queued for its lock (queuedAt, the
// server's clock). Sessions whose transaction began later only queued behind
// the swap and took their lock when it gave up: they are the application
// waiting, not blockers, and must be neither reported nor canceled.
func blockers(ctx context.Context, pool *pgxpool.Pool, relations []pgsql.QualifiedName, queuedAt time.Time) ([]Blocker, error) {
	names := make([]string, len(relations))
	for i, r := range relations {
		names[i] = r.Quoted()
	}
	rows, err := pool.Query(ctx, `
		SELECT DISTINCT a.pid, coalesce(a.usename, ''), coalesce(a.application_name, ''), coalesce(a.state, ''), a.xact_start, coalesce(a.query, ''),
		       a.backend_type = 'autovacuum worker'
		  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
		 WHERE l.granted AND l.relation = ANY(SELECT to_regclass(n)::oid FROM unnest($1::text[]) n) AND a.pid <> pg_backend_pid()
		   AND ($2::timestamptz IS NULL OR a.xact_start < $2)
		 ORDER BY a.pid`, names, nullTime(queuedAt))
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (Blocker, error) {
		var b Blocker
		err := r.Scan(&b.PID, &b.User, &b.Application, &b.State, &b.XactStart, &b.Query, &b.Autovacuum)
		return b, err
	})
}

// cancelAutovacuum cancels the autovacuum workers among the blockers, except
// those preventing wraparound. PostgreSQL does the same for any session that
// waits behind an autovacuum for deadlock_timeout (1 s by default); the swap's
// lock_timeout is far shorter, so without this an autovacuum of a large table
// holds the swap off for as long as it runs (40 s in the 8,000,000-row bench).
// Canceling needs the right to signal it (superuser, in PostgreSQL 15); without
// it the swap retries as before.
func cancelAutovacuum(ctx context.Context, pool *pgxpool.Pool, bs []Blocker, log zerolog.Logger) {
	for i, b := range bs {
		if !b.Autovacuum || strings.Contains(b.Query, "to prevent wraparound") {
			continue
		}
		var ok bool
		if err := pool.QueryRow(ctx, "SELECT pg_cancel_backend($1)", b.PID).Scan(&ok); err != nil || !ok {
			log.Debug().Int32("pid", b.PID).Err(err).Msg("could not cancel the autovacuum blocking the swap")
			continue
		}
		bs[i].Canceled = true
		log.Info().Int32("pid", b.PID).Str("blocker", b.String()).Msg("canceled an autovacuum blocking the swap (it runs again later)")
	}
}

// cancelBlockers cancels each blocker's statement, or terminates its session
// when it is idle in a transaction (a cancel does nothing there).
func cancelBlockers(ctx context.Context, pool *pgxpool.Pool, bs []Blocker, log zerolog.Logger) {
	for i, b := range bs {
		fn := "pg_cancel_backend"
		if b.State == "idle in transaction" || b.State == "idle in transaction (aborted)" {
			fn = "pg_terminate_backend"
		}
		var ok bool
		if err := pool.QueryRow(ctx, "SELECT "+fn+"($1)", b.PID).Scan(&ok); err == nil && ok {
			bs[i].Canceled = true
			log.Warn().Int32("pid", b.PID).Str("how", fn).Str("blocker", b.String()).Msg("canceled a session blocking the swap, as the operator allowed")
		}
	}
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

func oneLine(s string, n int) string {
	out := []rune{}
	for _, r := range s {
		if r == '\n' || r == '\t' {
			r = ' '
		}
		out = append(out, r)
		if len(out) >= n {
			out = append(out, '…')
			break
		}
	}
	return string(out)
}
