package sqlexec

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Operator-facing conditions.
var (
	// ErrRetriesExhausted means a statement kept failing on lock timeouts
	// (or deadlocks, serialization failures) until --retries ran out.
	ErrRetriesExhausted = errors.New("retries exhausted")
	// ErrTxControl means the file's BEGIN/COMMIT are not something exec can
	// run (unbalanced, nested, ROLLBACK, savepoints, prepared transactions).
	ErrTxControl = errors.New("unsupported transaction control in the file")
	// ErrNonTxInBlock means a statement that cannot run in a transaction
	// block sits between BEGIN and COMMIT in the file.
	ErrNonTxInBlock = errors.New("statement cannot run inside a transaction block")
	// ErrContractGuard means --strict refused a DROP COLUMN of a column that
	// statements recorded by pg_stat_statements still use.
	ErrContractGuard = errors.New("contract guard: a dropped column is still in use")
)

// StatementError says which statement failed and why.
type StatementError struct {
	Stmt     Statement
	Attempts int
	Err      error
}

func (e *StatementError) Error() string {
	return fmt.Sprintf("%s failed after %d attempt(s): %s", e.Stmt, e.Attempts, describe(e.Err))
}

func (e *StatementError) Unwrap() error { return e.Err }

func describe(err error) string {
	msg := pgsql.Describe(err)
	if errors.Is(err, ErrRetriesExhausted) && pgsql.Code(err) != "" {
		msg = ErrRetriesExhausted.Error() + ": " + msg
	}
	return msg
}

// Options tune a run.
type Options struct {
	// LockTimeout bounds every lock wait of every statement (default 2s).
	LockTimeout time.Duration
	// Retries is how many times a statement is retried after a lock
	// timeout, deadlock or serialization failure (default 10).
	Retries int
	// BackoffBase and BackoffMax shape the exponential backoff between
	// retries (defaults 200ms and 10s); each wait is jittered.
	BackoffBase, BackoffMax time.Duration
	// Strict turns contract-guard warnings into a refusal.
	Strict bool
	// Window is how much pg_stat_statements history the contract guard
	// wants (see Guard).
	Window time.Duration
	Log    zerolog.Logger
}

func (o *Options) defaults() {
	if o.LockTimeout <= 0 {
		o.LockTimeout = 2 * time.Second
	}
	if o.Retries < 0 {
		o.Retries = 0
	}
	if o.BackoffBase <= 0 {
		o.BackoffBase = 200 * time.Millisecond
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 10 * time.Second
	}
}

// Group is what runs as one unit: a single statement, or the statements of
// a BEGIN ... COMMIT block of the file.
type Group struct {
	Begin *Statement // the file's BEGIN, nil for a single statement
	Stmts []Statement
}

// NonTx reports whether the group is one statement that must run outside a
// transaction block.
func (g Group) NonTx() bool {
	return g.Begin == nil && len(g.Stmts) == 1 && g.Stmts[0].NonTransactional()
}

// Plan groups statements: each statement alone, except those between the
// file's BEGIN and COMMIT, which run in one transaction.
func Plan(stmts []Statement) ([]Group, error) {
	var groups []Group
	var open *Group
	for i := range stmts {
		st := stmts[i]
		switch st.txControl() {
		case "begin":
			if open != nil {
				return nil, fmt.Errorf("%s: BEGIN inside a block begun at statement %d: %w", st, open.Begin.Num, ErrTxControl)
			}
			open = &Group{Begin: &stmts[i]}
		case "commit":
			if open == nil {
				return nil, fmt.Errorf("%s: COMMIT without BEGIN: %w", st, ErrTxControl)
			}
			if len(open.Stmts) > 0 {
				groups = append(groups, *open)
			}
			open = nil
		case "rollback", "other":
			return nil, fmt.Errorf("%s: %w", st, ErrTxControl)
		default:
			if open != nil {
				if st.NonTransactional() {
					return nil, fmt.Errorf("%s (in the block begun at statement %d): %w", st, open.Begin.Num, ErrNonTxInBlock)
				}
				open.Stmts = append(open.Stmts, st)
				continue
			}
			groups = append(groups, Group{Stmts: []Statement{st}})
		}
	}
	if open != nil {
		return nil, fmt.Errorf("%s: BEGIN without COMMIT: %w", *open.Begin, ErrTxControl)
	}
	return groups, nil
}

// Result sums up a run.
type Result struct {
	Statements int // statements executed
	Retries    int // retries over all statements
	Findings   []Finding
	GuardNote  string
}

// Run executes the file's statements on conn, in order, stopping at the
// first failure (a *StatementError). The contract guard runs first, before
// any statement. conn must be a direct session (not a transaction pooler).
func Run(ctx context.Context, conn *pgx.Conn, src string, opt Options) (Result, error) {
	opt.defaults()
	var res Result
	stmts, err := Split(src)
	if err != nil {
		return res, fmt.Errorf("split: %w", err)
	}
	groups, err := Plan(stmts)
	if err != nil {
		return res, err
	}
	if drops := DropColumns(stmts); len(drops) > 0 {
		findings, note, err := Guard(ctx, conn, drops, opt.Window)
		if err != nil {
			return res, err
		}
		res.Findings, res.GuardNote = findings, note
		if note != "" {
			opt.Log.Warn().Msg("contract guard: " + note)
		}
		for _, f := range findings {
			opt.Log.Warn().Int("statement", f.Drop.Stmt.Num).Str("column", f.Drop.TableName+"."+f.Drop.Column).
				Int64("calls", f.Calls).Str("example", f.Example).Msg("contract guard: " + f.String())
		}
		if opt.Strict && len(findings) > 0 {
			return res, fmt.Errorf("%s: %w (--strict)", findings[0], ErrContractGuard)
		}
	}
	if err := pgsql.SetLockTimeout(ctx, conn, opt.LockTimeout); err != nil {
		return res, fmt.Errorf("set lock_timeout: %w", err)
	}
	r := &runner{conn: conn, opt: opt}
	for _, g := range groups {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		n, err := r.runGroup(ctx, g)
		res.Retries += r.retries
		r.retries = 0
		res.Statements += n
		if err != nil {
			return res, err
		}
	}
	return res, nil
}

type runner struct {
	conn    *pgx.Conn
	opt     Options
	retries int
}

// backoff waits before retry number attempt (1-based), jittered.
func (r *runner) backoff(ctx context.Context, attempt int) error {
	d := r.opt.BackoffBase << min(attempt-1, 20)
	if d > r.opt.BackoffMax || d <= 0 {
		d = r.opt.BackoffMax
	}
	d = d/2 + rand.N(d/2+1)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// runGroup runs one group with retries; it returns how many statements ran.
func (r *runner) runGroup(ctx context.Context, g Group) (int, error) {
	first := g.Stmts[0]
	for attempt := 1; ; attempt++ {
		start := time.Now()
		var failed Statement
		var err error
		if g.NonTx() {
			failed = first
			err = r.runAlone(ctx, first)
		} else {
			failed, err = r.runTx(ctx, g)
		}
		if err == nil {
			r.opt.Log.Info().Int("statement", first.Num).Int("line", first.Line).Int("statements", len(g.Stmts)).
				Dur("took", time.Since(start)).Int("attempt", attempt).Msg("ran " + first.FirstLine())
			return len(g.Stmts), nil
		}
		if ctx.Err() != nil {
			return 0, &StatementError{Stmt: failed, Attempts: attempt, Err: ctx.Err()}
		}
		if !pgsql.IsRetryable(err) {
			return 0, &StatementError{Stmt: failed, Attempts: attempt, Err: err}
		}
		if attempt > r.opt.Retries {
			return 0, &StatementError{Stmt: failed, Attempts: attempt, Err: fmt.Errorf("%w: %w", ErrRetriesExhausted, err)}
		}
		r.retries++
		r.opt.Log.Warn().Int("statement", failed.Num).Int("line", failed.Line).Int("attempt", attempt).
			Str("error", pgsql.Describe(err)).Msg("retrying " + failed.FirstLine())
		if err := r.backoff(ctx, attempt); err != nil {
			return 0, &StatementError{Stmt: failed, Attempts: attempt, Err: err}
		}
	}
}

// runTx runs a group in one transaction under SET LOCAL lock_timeout.
func (r *runner) runTx(ctx context.Context, g Group) (Statement, error) {
	begin := "BEGIN"
	if g.Begin != nil {
		begin = g.Begin.SQL
	}
	if _, err := r.conn.Exec(ctx, begin); err != nil {
		return g.Stmts[0], err
	}
	rollback := func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		defer cancel()
		_, _ = r.conn.Exec(rctx, "ROLLBACK")
	}
	if err := pgsql.SetLocalLockTimeout(ctx, r.conn, r.opt.LockTimeout); err != nil {
		rollback()
		return g.Stmts[0], err
	}
	for _, st := range g.Stmts {
		if _, err := r.conn.Exec(ctx, st.SQL); err != nil {
			rollback()
			return st, err
		}
	}
	if _, err := r.conn.Exec(ctx, "COMMIT"); err != nil {
		rollback()
		return g.Stmts[len(g.Stmts)-1], err
	}
	return Statement{}, nil
}

// runAlone runs a statement that cannot be in a transaction block, under the
// session's lock_timeout. A CREATE INDEX CONCURRENTLY that fails leaves an
// INVALID index: it is dropped (DROP INDEX CONCURRENTLY IF EXISTS) before
// the retry, and after a final failure, and an INVALID index of the same
// name left by an earlier run is dropped before the first attempt.
func (r *runner) runAlone(ctx context.Context, st Statement) error {
	name, table, isCIC := st.concurrentIndex()
	if !isCIC {
		_, err := r.conn.Exec(ctx, st.SQL)
		return err
	}
	before, err := r.invalidIndexes(ctx, table)
	if err != nil {
		return err
	}
	if name != "" {
		for _, ix := range before {
			if ix.Name == name {
				r.opt.Log.Warn().Int("statement", st.Num).Str("index", ix.String()).
					Msg("dropping the INVALID index an earlier failed build left")
				if err := r.dropIndex(ctx, ix); err != nil {
					return err
				}
			}
		}
	}
	_, runErr := r.conn.Exec(ctx, st.SQL)
	if runErr == nil {
		return nil
	}
	after, err := r.invalidIndexes(ctx, table)
	if err != nil {
		return errors.Join(runErr, err)
	}
	for _, ix := range after {
		ours := (name != "" && ix.Name == name) || (name == "" && !contains(names(before), ix.Name))
		if !ours {
			continue
		}
		r.opt.Log.Warn().Int("statement", st.Num).Str("index", ix.String()).Str("error", pgsql.Describe(runErr)).
			Msg("the concurrent build failed; dropping the INVALID index it left")
		if err := r.dropIndexRetrying(ctx, ix); err != nil {
			return errors.Join(runErr, fmt.Errorf("drop the INVALID index %s: %w", ix, err))
		}
	}
	return runErr
}

func names(q []pgsql.QualifiedName) []string {
	var out []string
	for _, x := range q {
		out = append(out, x.Name)
	}
	return out
}

// invalidIndexes lists the INVALID indexes of table (as the operator wrote
// it; nothing when it does not exist).
func (r *runner) invalidIndexes(ctx context.Context, table string) ([]pgsql.QualifiedName, error) {
	rows, err := r.conn.Query(ctx, `SELECT n.nspname, c.relname
		FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE i.indrelid = to_regclass($1) AND NOT i.indisvalid ORDER BY 1, 2`, table)
	if err != nil {
		return nil, fmt.Errorf("list invalid indexes of %s: %w", table, err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (pgsql.QualifiedName, error) {
		var q pgsql.QualifiedName
		err := row.Scan(&q.Schema, &q.Name)
		return q, err
	})
	if err != nil {
		return nil, fmt.Errorf("list invalid indexes of %s: %w", table, err)
	}
	return out, nil
}

func (r *runner) dropIndex(ctx context.Context, ix pgsql.QualifiedName) error {
	_, err := r.conn.Exec(ctx, "DROP INDEX CONCURRENTLY IF EXISTS "+ix.Quoted())
	return err
}

// dropIndexRetrying drops an index, retrying lock timeouts like a statement.
func (r *runner) dropIndexRetrying(ctx context.Context, ix pgsql.QualifiedName) error {
	for attempt := 1; ; attempt++ {
		err := r.dropIndex(ctx, ix)
		if err == nil || !pgsql.IsRetryable(err) || attempt > r.opt.Retries {
			return err
		}
		r.opt.Log.Warn().Str("index", ix.String()).Int("attempt", attempt).Str("error", pgsql.Describe(err)).
			Msg("retrying the drop of the INVALID index")
		if err := r.backoff(ctx, attempt); err != nil {
			return err
		}
	}
}
