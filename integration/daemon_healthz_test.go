package integration

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/daemon"
)

// /healthz says 503 once the daemon has not read its catalog for a while
// (three polls and 10 s), here because a session holds the catalog's
// migrations table locked, and 200 again once a scan goes through.
func TestHealthzFailsWhileTheCatalogCannotBeRead(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	d := db.startDaemon(daemon.Config{HTTPAddr: "127.0.0.1:0"})
	base := "http://" + d.Addr()
	d.waitScans(t, 1)
	if code, _ := httpDo(t, "GET", base+"/healthz", ""); code != 200 {
		t.Fatalf("/healthz with the catalog readable: %d, want 200", code)
	}
	blocker, err := pgx.Connect(ctx, db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close(ctx)
	if _, err := blocker.Exec(ctx, `BEGIN; LOCK TABLE shadowctl.migrations IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	var body []byte
	waitTrue(t, 60*time.Second, "/healthz to say 503", func() bool {
		var code int
		code, body = httpDo(t, "GET", base+"/healthz", "")
		return code == 503
	})
	t.Logf("/healthz: %s", body)
	if _, err := blocker.Exec(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	waitTrue(t, 60*time.Second, "/healthz to say 200 again", func() bool {
		code, _ := httpDo(t, "GET", base+"/healthz", "")
		return code == 200
	})
}
