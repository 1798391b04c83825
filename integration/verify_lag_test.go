package integration

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
)

// With an asynchronous sync, chunks that differ only because green lags are
// compared again after a catch-up that serves many of them: ten lagging
// chunks cost two catch-ups, not ten, and none is taken for a mismatch. A
// difference the catch-ups do not remove is still reported, naming its
// chunk.
func TestVerifierSharesCatchUpsBetweenLaggingChunks(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 1000) // keys 2, 4, ..., 2000
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil || m.Phase != shadow.Ready {
		t.Fatalf("drive: %v %v", m.Phase, err)
	}
	db.exec(`ALTER TABLE green.items DISABLE TRIGGER ALL`)
	var catchUps atomic.Int64
	// The stand-in for the stream: a catch-up applies what green lacks.
	catchUp := func(ctx context.Context) error {
		catchUps.Add(1)
		_, err := db.Pool.Exec(ctx, `UPDATE green.items g SET v = b.v FROM public.items b WHERE g.id = b.id AND g.v <> b.v`)
		return err
	}
	verifier := func() *cutover.Verifier {
		return &cutover.Verifier{Pool: db.Pool, Mapping: m.State.Plan.Forward, ChunkRows: 100, Workers: 2, Chunked: true,
			CatchUp: catchUp, Log: zerolog.Nop()}
	}

	// One row behind in each of the first ten chunks (100 rows each).
	db.exec(`UPDATE green.items SET v = 'behind' WHERE id % 200 = 100`)
	res, err := verifier().Run(ctx)
	if err != nil || !res.OK || res.Chunks != 11 || res.Rows != 1000 || res.Mismatched != 0 {
		t.Fatalf("lagging green: %+v, %v; want 1000 rows in 11 chunks, no mismatch", res, err)
	}
	if n := catchUps.Load(); n != int64(res.CatchUps) || n < 1 || n > 2 {
		t.Fatalf("%d catch-ups (result says %d) for ten lagging chunks; want one or two shared ones", n, res.CatchUps)
	}
	db.assertGreenMatches(`SELECT id, v, n::bigint FROM public.items`, `SELECT id, v, n FROM green.items`)

	// A difference the stream does not explain: compared again after each
	// catch-up, then under the quiet lock, and reported.
	catchUps.Store(0)
	db.exec(`UPDATE green.items SET n = -1 WHERE id = 500`)
	res, err = verifier().Run(ctx)
	if !errors.Is(err, cutover.ErrMismatch) || res.Mismatched != 1 || !strings.Contains(res.FirstMismatch, "keys (400, 600]") {
		t.Fatalf("a real difference: %+v, %v; want ErrMismatch naming keys (400, 600]", res, err)
	}
	// Three shared catch-ups, then the quiet compare's two.
	if n := catchUps.Load(); n != 5 {
		t.Fatalf("%d catch-ups for one persistent difference; want 3 + 2 (quiet compare)", n)
	}
}
