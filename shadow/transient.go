package shadow

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// ErrTransient marks a phase interrupted by a lost database connection (or a
// server shutting down): the migration is not failed; its driver retries
// from the last checkpoint.
var ErrTransient = errors.New("the database connection was lost")

// IsTransient reports whether err is a lost connection or a server going
// away (SQLSTATE class 08, admin/crash shutdown, cannot connect now) rather
// than something about the migration.
func IsTransient(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	if errors.Is(err, ErrTransient) {
		return true
	}
	switch code := pgsql.Code(err); {
	case strings.HasPrefix(code, "08"), code == "57P01", code == "57P02", code == "57P03":
		return true
	case code != "":
		return false
	}
	var netErr net.Error
	var connErr *pgconn.ConnectError
	if errors.As(err, &netErr) || errors.As(err, &connErr) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) {
		return true
	}
	return strings.Contains(err.Error(), "conn closed") || strings.Contains(err.Error(), "connection reset")
}
