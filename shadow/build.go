package shadow

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/rowmap"
)

// buildGreen creates green in tx from blue's definition and the operator's
// ALTER, derives the mappings, and checks that the copy and both syncs
// compile. Run in a transaction that is rolled back, it is the preflight
// ("try the ALTER on a scratch copy"); committed, it is the real build.
//
// Green starts as a copy of blue with every index and constraint (so the
// ALTER can refer to them), then the ALTER is applied, then every index but
// green's key and every foreign key is dropped again and recorded to be
// re-created after the bulk copy (indexes CONCURRENTLY, foreign keys NOT
// VALID then VALIDATE), which is several times faster than loading an indexed
// table. In logical sync green's key is deferred too (deferKey).
func buildGreen(ctx context.Context, tx pgx.Tx, req Request, blue *pgmeta.Table, names ObjectNames) (*Plan, bool, error) {
	green := pgsql.QualifiedName{Schema: req.GreenSchema, Name: blue.Name}
	if green.Schema == blue.Schema {
		return nil, false, fmt.Errorf("%w: --green-schema must differ from the table's schema %s", ErrBadRequest, pgsql.Ident(blue.Schema))
	}
	// Two migrations prepared at once (two daemons) would both create the
	// green schema: serialise on its name until this transaction ends.
	if err := lockGreenSchemaName(ctx, tx, green.Schema); err != nil {
		return nil, false, err
	}
	var schemaExists bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)`, green.Schema).Scan(&schemaExists); err != nil {
		return nil, false, err
	}
	if !schemaExists {
		if _, err := tx.Exec(ctx, "CREATE SCHEMA "+pgsql.Ident(green.Schema)); err != nil {
			return nil, false, fmt.Errorf("create green schema %s: %w", pgsql.Ident(green.Schema), err)
		}
	} else {
		var exists bool
		if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, green.Quoted()).Scan(&exists); err != nil {
			return nil, false, err
		}
		if exists {
			return nil, false, fmt.Errorf("%s: %w (another migration's green table, or a leftover: drop it or choose --green-schema)", green, ErrGreenExists)
		}
	}
	var searchPath string
	if err := tx.QueryRow(ctx, `SELECT current_setting('search_path')`).Scan(&searchPath); err != nil {
		return nil, false, err
	}
	// Defaults, CHECK and NOT NULL constraints, generated columns, storage and
	// comments come with LIKE; identity does not (green draws from blue's
	// sequence instead, below), nor do indexes (added next, then dropped).
	if _, err := tx.Exec(ctx, fmt.Sprintf(`CREATE TABLE %s (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED
		INCLUDING STORAGE INCLUDING COMMENTS INCLUDING COMPRESSION INCLUDING STATISTICS)`, green.Quoted(), blue.QName().Quoted())); err != nil {
		return nil, false, fmt.Errorf("create %s: %w", green, err)
	}
	// Storage parameters (fillfactor, autovacuum settings, ...), and room
	// for the sync's updates unless blue sets its own fillfactor.
	opts := blue.Reloptions
	if greenGetsFillfactor(blue) {
		opts = append(slices.Clone(opts), fmt.Sprintf("fillfactor = %d", greenFillfactor))
	}
	if len(opts) > 0 {
		if _, err := tx.Exec(ctx, fmt.Sprintf("ALTER TABLE %s SET (%s)", green.Quoted(), strings.Join(opts, ", "))); err != nil {
			return nil, false, fmt.Errorf("copy storage parameters %v: %w", opts, err)
		}
	}
	for _, s := range blue.Sequences {
		if !s.Identity {
			continue
		}
		seq := pgsql.QualifiedName{Schema: s.Schema, Name: s.Name}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`ALTER TABLE %s ALTER COLUMN %s SET DEFAULT nextval(%s::regclass)`,
			green.Quoted(), pgsql.Ident(s.Column), pgsql.Literal(seq.Quoted()))); err != nil {
			return nil, false, fmt.Errorf("identity column %s: %w", s.Column, err)
		}
	}
	// Blue's indexes and constraints under their own names, so that the ALTER
	// may refer to them.
	for _, ix := range blue.Indexes {
		stmt := ""
		switch {
		case ix.ConType == "p" || ix.ConType == "u":
			def := ""
			for _, c := range blue.Constraints {
				if c.Name == ix.Constraint {
					def = c.Def
				}
			}
			stmt = fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s %s", green.Quoted(), pgsql.Ident(ix.Constraint), def)
		default:
			var err error
			if stmt, err = rewriteIndexDef(ix.Def, blue, green, ix.Name, false); err != nil {
				return nil, false, err
			}
		}
		if _, err := tx.Exec(ctx, stmt); err != nil {
			return nil, false, fmt.Errorf("copy index %s to green: %w", ix.Name, err)
		}
	}
	// Outbound foreign keys: copied now so that the ALTER may refer to them.
	for _, c := range blue.Constraints {
		if c.Type != "f" {
			continue
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`ALTER TABLE %s ADD CONSTRAINT %s %s NOT VALID`, green.Quoted(), pgsql.Ident(c.Name), c.Def)); err != nil {
			return nil, false, fmt.Errorf("copy foreign key %s: %w", c.Name, err)
		}
	}
	if _, err := tx.Exec(ctx, "SAVEPOINT before_alter"); err != nil {
		return nil, false, err
	}
	if _, err := tx.Exec(ctx, fmt.Sprintf("ALTER TABLE %s %s", green.Quoted(), req.Alter)); err != nil {
		return nil, false, fmt.Errorf("%w: PostgreSQL refused it on green: %s", ErrBadAlter, pgsql.Describe(err))
	}
	greenT, err := pgmeta.Load(ctx, tx, green.Schema, green.Name)
	if err != nil {
		return nil, false, err
	}
	if len(greenT.Key) == 0 {
		return nil, false, fmt.Errorf("%s: %w after the ALTER (keep or add a primary key or a unique index on NOT NULL columns)", blue.QName(), ErrGreenNoKey)
	}
	cmds, err := parseAlter(req.Alter)
	if err != nil {
		return nil, false, err
	}
	using := map[string]string{}
	for _, c := range cmds {
		if c.TypeChange != nil {
			using[c.TypeChange.Column] = c.TypeChange.Using
		}
	}
	fwd, rev, err := buildMappings(req, blue, greenT, using)
	if err != nil {
		return nil, false, err
	}
	plan := &Plan{Blue: blue, Forward: fwd, Reverse: rev, Names: names, SearchPath: searchPath}

	// Defer every index but the key (in logical sync the key too, below:
	// deferKey), and every foreign key.
	for _, ix := range greenT.Indexes {
		if !secondary(greenT, ix) {
			continue
		}
		plan.DeferredIndexes = append(plan.DeferredIndexes, ix)
		if _, err := tx.Exec(ctx, dropIndexSQL(green, ix)); err != nil {
			return nil, false, fmt.Errorf("defer index %s: %w", ix.Name, err)
		}
	}
	for _, c := range greenT.Constraints {
		if c.Type != "f" {
			continue
		}
		plan.DeferredConstraints = append(plan.DeferredConstraints, c)
		if _, err := tx.Exec(ctx, fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT %s", green.Quoted(), pgsql.Ident(c.Name))); err != nil {
			return nil, false, fmt.Errorf("defer foreign key %s: %w", c.Name, err)
		}
	}
	if plan.Green, err = pgmeta.Load(ctx, tx, green.Schema, green.Name); err != nil {
		return nil, false, err
	}
	for _, ix := range plan.DeferredIndexes {
		if _, err := rewriteIndexDef(ix.Def, plan.Green, green, ix.Name, true); err != nil {
			return nil, false, err
		}
	}
	if err := checkCompiles(ctx, tx, plan); err != nil {
		return nil, false, err
	}
	if req.Sync == SyncLogical {
		if err := deferKey(ctx, tx, plan); err != nil {
			return nil, false, err
		}
	}
	return plan, !schemaExists, nil
}

// deferKey drops green's key too, to be built first after the copy (logical
// sync only; plan.Green keeps describing green as it will be). Nothing but
// the copy writes green until then, in disjoint ranges that commit with
// their checkpoints, so no row can arrive twice. Maintaining the key index
// row by row cost more than building it once, and its WAL is read back by
// the WAL sender, which spends most of its time per record on a check for
// replies from the client: 2,000,000 rows in 10,000-row batches from 2
// sessions wrote in 5.5–6.0 s with the key and 3.1 s without, the WAL sender
// decoded them in 4.3–4.5 s and 2.6 s, and the key was built in 1.0 s.
// The columns stay NOT NULL (dropping a primary key keeps that).
func deferKey(ctx context.Context, tx pgx.Tx, plan *Plan) error {
	green := plan.Forward.Target
	for _, ix := range plan.Green.Indexes {
		if ix.Name != plan.Green.KeyIndex {
			continue
		}
		if _, err := tx.Exec(ctx, dropIndexSQL(green, ix)); err != nil {
			return fmt.Errorf("defer green's key %s: %w", ix.Name, err)
		}
		plan.DeferredIndexes = append([]pgmeta.Index{ix}, plan.DeferredIndexes...)
		return nil
	}
	return fmt.Errorf("green's key index %s not found: %w", plan.Green.KeyIndex, ErrGreenNoKey)
}

// dropIndexSQL drops one of green's indexes, through its constraint when it
// backs one.
func dropIndexSQL(green pgsql.QualifiedName, ix pgmeta.Index) string {
	if ix.Constraint != "" {
		return fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT %s", green.Quoted(), pgsql.Ident(ix.Constraint))
	}
	return fmt.Sprintf("DROP INDEX %s", pgsql.QualifiedName{Schema: green.Schema, Name: ix.Name}.Quoted())
}

// checkCompiles plans (EXPLAIN, nothing runs) the copy statement and both
// directions of the sync, so type mismatches and bad expressions surface
// before anything is created.
func checkCompiles(ctx context.Context, tx pgx.Tx, plan *Plan) error {
	check := func(what string, m rowmap.Mapping, from string) error {
		if _, err := tx.Exec(ctx, "SAVEPOINT compile_check"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, "EXPLAIN "+m.InsertSelect(from)+" "+m.OnConflictUpdate())
		if _, rerr := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT compile_check"); rerr != nil && err == nil {
			err = rerr
		}
		if err != nil {
			hint := ""
			if strings.Contains(pgsql.Describe(err), "is of type") {
				hint = " (give the conversion with USING in --alter, or a --map/--reverse-map expression)"
			}
			return fmt.Errorf("%w: %s: %s%s", ErrBadMapping, what, pgsql.Describe(err), hint)
		}
		return nil
	}
	if err := check("copying blue into green", plan.Forward, "ONLY "+plan.Forward.Source.Quoted()); err != nil {
		return err
	}
	return check("the reverse sync (green into blue, after the cutover)", plan.Reverse, "ONLY "+plan.Reverse.Source.Quoted())
}

// isBadRequest reports errors that mean "the request cannot work as given".
func isBadRequest(err error) bool {
	for _, e := range []error{ErrBadRequest, ErrBadAlter, ErrNoSuchTable, ErrNotPlainTable, ErrNoKey, ErrGreenNoKey,
		ErrKeyDropped, ErrGreenExists, ErrNoReverseMapping, ErrBadMapping, ErrDependents, ErrStorageBudget, ErrUnsupported, ErrTableBusy} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// greenFillfactor leaves room on each page green is loaded with: a page the
// copy packs full has none for a new row version, so every update the sync
// makes to green (the trigger's upsert, the logical apply) is then a non-HOT
// one, a new version on another page plus an entry in each of green's
// indexes. With room on the page it is a HOT update: same page, no index
// entries. Finalize resets it (blue had none): later pages are filled as
// blue's were, the loaded ones keep their room.
const greenFillfactor = 90

// greenGetsFillfactor says whether green gets greenFillfactor: when blue sets
// no fillfactor of its own (an operator's choice is kept as it is).
func greenGetsFillfactor(blue *pgmeta.Table) bool {
	return !slices.ContainsFunc(blue.Reloptions, func(o string) bool { return strings.HasPrefix(o, "fillfactor=") })
}
