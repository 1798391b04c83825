// Package pgsql holds the small PostgreSQL helpers every shadowctl package
// shares: identifier quoting, lock_timeout scoping, error classification and
// DSN redaction. It owns no state and knows nothing about migrations.
package pgsql

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Ident quotes one identifier (pgx's quoting).
func Ident(name string) string { return pgx.Identifier{name}.Sanitize() }

// QualifiedName is a schema-qualified relation or function name.
type QualifiedName struct {
	Schema string
	Name   string
}

// Quoted is the name as SQL, both parts quoted.
func (q QualifiedName) Quoted() string { return pgx.Identifier{q.Schema, q.Name}.Sanitize() }

// String is the name for people: quoted only where SQL would need it.
func (q QualifiedName) String() string { return q.Quoted() }

// Literal quotes a string as an SQL literal.
func Literal(s string) string {
	return "'" + strings.ReplaceAll(s, "'", "''") + "'"
}

// Querier is what both a connection and a transaction offer.
type Querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// SetLocalLockTimeout bounds every lock wait of the current transaction.
func SetLocalLockTimeout(ctx context.Context, tx Querier, d time.Duration) error {
	_, err := tx.Exec(ctx, LocalLockTimeoutSQL(d))
	return err
}

// LocalLockTimeoutSQL is SetLocalLockTimeout's statement, for callers that
// send it together with other settings.
func LocalLockTimeoutSQL(d time.Duration) string {
	return fmt.Sprintf("SET LOCAL lock_timeout = '%dms'", max(d.Milliseconds(), 1))
}

// SetLockTimeout bounds lock waits for the session (statements outside an
// explicit transaction).
func SetLockTimeout(ctx context.Context, c Querier, d time.Duration) error {
	_, err := c.Exec(ctx, fmt.Sprintf("SET lock_timeout = '%dms'", max(d.Milliseconds(), 1)))
	return err
}

// Code returns the SQLSTATE of a PostgreSQL error, or "".
func Code(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return ""
}

// SQLSTATEs the tool reacts to.
const (
	CodeLockNotAvailable     = "55P03"
	CodeQueryCanceled        = "57014"
	CodeDeadlockDetected     = "40P01"
	CodeSerializationFailure = "40001"
	CodeUniqueViolation      = "23505"
	CodeUndefinedTable       = "42P01"
	CodeDuplicateObject      = "42710"
	CodeDuplicateSchema      = "42P06"
	CodeDuplicateTable       = "42P07"
)

// IsLockTimeout reports whether err is a lock_timeout expiry.
func IsLockTimeout(err error) bool { return Code(err) == CodeLockNotAvailable }

// IsRetryable reports whether a short transaction that failed with err may be
// retried as it was: lock timeouts, deadlocks and serialization failures.
func IsRetryable(err error) bool {
	switch Code(err) {
	case CodeLockNotAvailable, CodeDeadlockDetected, CodeSerializationFailure:
		return true
	}
	return false
}

// Describe renders a PostgreSQL error with its code, detail and hint, for
// messages to operators.
func Describe(err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return err.Error()
	}
	return withDetail(fmt.Sprintf("%s (SQLSTATE %s)", pgErr.Message, pgErr.Code), pgErr)
}

// DescribeWrapped renders err whole, with what wraps the PostgreSQL error
// (e.g. "retries exhausted after 11 attempts: ..."), plus its detail and
// hint, which err.Error() leaves out.
func DescribeWrapped(err error) string {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return err.Error()
	}
	return withDetail(err.Error(), pgErr)
}

func withDetail(s string, pgErr *pgconn.PgError) string {
	if pgErr.Detail != "" {
		s += "; detail: " + pgErr.Detail
	}
	if pgErr.Hint != "" {
		s += "; hint: " + pgErr.Hint
	}
	return s
}

// Password extracts the password from a DSN (URL or key=value form), or "".
func Password(dsn string) string {
	if dsn == "" {
		return ""
	}
	if cfg, err := pgconn.ParseConfig(dsn); err == nil {
		return cfg.Password
	}
	if u, err := url.Parse(dsn); err == nil && u.User != nil {
		if p, ok := u.User.Password(); ok {
			return p
		}
	}
	for _, f := range strings.Fields(dsn) {
		if v, ok := strings.CutPrefix(f, "password="); ok {
			return strings.Trim(v, "'")
		}
	}
	return ""
}

// Redact removes every occurrence of the DSN's password (and its URL-escaped
// form) from s.
func Redact(s, dsn string) string {
	pw := Password(dsn)
	if pw == "" {
		return s
	}
	s = strings.ReplaceAll(s, pw, "xxxxx")
	if esc := url.QueryEscape(pw); esc != pw {
		s = strings.ReplaceAll(s, esc, "xxxxx")
	}
	if esc := url.PathEscape(pw); esc != pw {
		s = strings.ReplaceAll(s, esc, "xxxxx")
	}
	return s
}

// RedactedError wraps an error so that its message never shows a password.
type RedactedError struct {
	err error
	dsn string
}

// RedactError returns err with the DSN's password removed from its message.
func RedactError(err error, dsn string) error {
	if err == nil || Password(dsn) == "" {
		return err
	}
	return &RedactedError{err: err, dsn: dsn}
}

func (e *RedactedError) Error() string { return Redact(e.err.Error(), e.dsn) }
func (e *RedactedError) Unwrap() error { return e.err }

// PipelineError is a statement of ExecPipelined that failed: its position
// and the server's error.
type PipelineError struct {
	Index int
	SQL   string
	Err   error
}

func (e *PipelineError) Error() string { return fmt.Sprintf("%s: %v", e.SQL, e.Err) }
func (e *PipelineError) Unwrap() error { return e.Err }

// Statement is one statement with its arguments in PostgreSQL's text
// format (nil: NULL); the server infers their types.
type Statement struct {
	SQL  string
	Args [][]byte
}

// ExecPipelined runs parameterless statements inside tx in one round trip
// (one extended-protocol pipeline, one Sync) rather than one each. A swap
// runs a dozen DDL statements while the application waits on its lock; on a
// busy 2-core machine each round trip cost 0.2–2 ms of that wait. The
// statements run in order in tx's transaction; the first failure ends the
// transaction (the server skips the rest) and comes back as a
// *PipelineError naming the statement (by its label: its first line).
func ExecPipelined(ctx context.Context, tx pgx.Tx, stmts []string) error {
	_, err := ExecPipelinedThen(ctx, tx, stmts, nil)
	return err
}

// ExecPipelinedThen is ExecPipelined with one more statement at the end of
// the same pipeline, whose row count it returns (a swap's catalog record:
// sent after the DDL it cost another round trip, 4–7 ms under the lock).
func ExecPipelinedThen(ctx context.Context, tx pgx.Tx, stmts []string, last *Statement) (lastRows int, err error) {
	if len(stmts) == 0 && last == nil {
		return 0, nil
	}
	var b pgconn.Batch
	labels := make([]string, 0, len(stmts)+1)
	for _, s := range stmts {
		b.ExecParams(s, nil, nil, nil, nil)
		labels = append(labels, s)
	}
	if last != nil {
		b.ExecParams(last.SQL, last.Args, nil, nil, nil)
		labels = append(labels, last.SQL)
	}
	mrr := tx.Conn().PgConn().ExecBatch(ctx, &b)
	done := 0
	for mrr.NextResult() {
		rr := mrr.ResultReader()
		rows := 0
		for rr.NextRow() {
			rows++
		}
		if _, err := rr.Close(); err != nil {
			break
		}
		lastRows = rows
		done++
	}
	if err := mrr.Close(); err != nil {
		i := min(done, len(labels)-1)
		return 0, &PipelineError{Index: i, SQL: FirstLine(labels[i], 120), Err: err}
	}
	return lastRows, nil
}

// FirstLine is a statement's label for errors and logs: its first line, at
// most n bytes.
func FirstLine(s string, n int) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > n {
		s = strings.ToValidUTF8(s[:n], "") + "…"
	}
	return s
}
