package integration

import (
	"context"
	"testing"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
)

// A table with a column type that has no hash function (json) is verified
// through the rows' text form, and a changed json value is still caught.
func TestVerifyTypesWithoutHashFunction(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	db.exec(`CREATE TABLE docs (id int PRIMARY KEY, body json, tags text[])`,
		`INSERT INTO docs SELECT g, json_build_object('n', g), ARRAY['a', g::text] FROM generate_series(1, 3000) g`)
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "docs", Alter: "ALTER COLUMN id TYPE bigint"})
	if err != nil {
		t.Fatal(err)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil || m.Phase != shadow.Ready {
		t.Fatalf("drive: %v %v", m.Phase, err)
	}
	db.exec(`ALTER TABLE green.docs DISABLE TRIGGER ALL`, `UPDATE green.docs SET body = '{"n": -1}' WHERE id = 1500`)
	v := &cutover.Verifier{Pool: db.Pool, Mapping: m.State.Plan.Forward, ChunkRows: 500, Workers: 2, Chunked: true, Log: zerolog.Nop()}
	if _, err := v.Run(ctx); err == nil {
		t.Fatal("a changed json value in green was not caught")
	}
}
