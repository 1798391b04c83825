package gate

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Channel is where the core NOTIFYs phase changes (payload: migration id).
const Channel = "shadowctl"

// ErrTimeout means the wait ran out of time before the phase was reached.
var ErrTimeout = errors.New("timed out")

// WaitOptions say what to wait for.
type WaitOptions struct {
	Catalog catalog.Catalog
	ID      string
	Phase   string
	Timeout time.Duration
	// Poll is how often the catalog is read when no NOTIFY arrives
	// (default 2s).
	Poll time.Duration
	// Connect opens a connection; it is called again after a connection
	// is lost.
	Connect func(context.Context) (*pgx.Conn, error)
	Log     zerolog.Logger
}

// Wait blocks until the migration reaches the phase (Reached), fails, is
// aborted or does not exist (Failed), or the timeout passes (NotYet with
// ErrTimeout). It LISTENs on Channel and reads the catalog on each
// notification and every Poll; lost connections are reopened until the
// timeout. The reason is one line for operators.
func Wait(ctx context.Context, o WaitOptions) (Verdict, string, error) {
	if err := ValidatePhase(o.Phase); err != nil {
		return Failed, "", err
	}
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	last := "no answer from the database yet"
	for {
		if conn == nil {
			c, err := o.Connect(ctx)
			if err == nil {
				_, err = c.Exec(ctx, "LISTEN "+pgsql.Ident(Channel))
				if err != nil {
					c.Close(context.Background())
				}
			}
			if err != nil {
				if ctx.Err() != nil {
					return timeoutOr(ctx, o, last)
				}
				last = "cannot reach the database: " + err.Error()
				o.Log.Warn().Err(err).Msg("wait: connecting (will retry)")
				if !sleep(ctx, o.Poll) {
					return timeoutOr(ctx, o, last)
				}
				continue
			}
			conn = c
		}
		s, err := ReadMigration(ctx, conn, o.Catalog, o.ID)
		if err != nil {
			if ctx.Err() != nil {
				return timeoutOr(ctx, o, last)
			}
			last = "cannot read the catalog: " + err.Error()
			o.Log.Warn().Err(err).Msg("wait: reading the catalog (will retry)")
			conn.Close(context.Background())
			conn = nil
			if !sleep(ctx, o.Poll) {
				return timeoutOr(ctx, o, last)
			}
			continue
		}
		v, reason := Judge(o.ID, o.Phase, s)
		if v != NotYet {
			return v, reason, nil
		}
		if reason != last {
			o.Log.Info().Str("migration", o.ID).Str("phase", s.Phase).Str("want", o.Phase).Msg(reason)
		}
		last = reason
		// Until a notification or the next poll.
		wctx, wcancel := context.WithTimeout(ctx, o.Poll)
		_, err = conn.WaitForNotification(wctx)
		wcancel()
		if err != nil && ctx.Err() != nil {
			return timeoutOr(ctx, o, last)
		}
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && !pgconnTimeout(err) {
			o.Log.Warn().Err(err).Msg("wait: connection lost (will reconnect)")
			conn.Close(context.Background())
			conn = nil
		}
	}
}

// pgconnTimeout recognises the error pgx returns when a wait's context ends.
func pgconnTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

func timeoutOr(ctx context.Context, o WaitOptions, last string) (Verdict, string, error) {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return NotYet, fmt.Sprintf("timed out after %s: %s", o.Timeout, last), ErrTimeout
	}
	return NotYet, last, ctx.Err()
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
