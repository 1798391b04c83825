package sqlexec

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// DropColumn is one `ALTER TABLE t DROP [COLUMN] c` found in a file.
type DropColumn struct {
	Stmt Statement
	// Table is the table as written (for to_regclass); TableName its last
	// part, case-folded.
	Table, TableName string
	Column           string
}

// DropColumns finds the DROP COLUMN actions of ALTER TABLE statements.
func DropColumns(stmts []Statement) []DropColumn {
	var out []DropColumn
	for _, st := range stmts {
		t := st.toks
		if len(t) < 4 || t[0].upper() != "ALTER" || t[1].upper() != "TABLE" {
			continue
		}
		i := 2
		if i+1 < len(t) && t[i].upper() == "IF" && t[i+1].upper() == "EXISTS" {
			i += 2
		}
		if i < len(t) && t[i].upper() == "ONLY" {
			i++
		}
		var table strings.Builder
		var last string
		for i < len(t) {
			id, ok := t[i].ident()
			if !ok {
				break
			}
			table.WriteString(t[i].text)
			last = id
			i++
			if i+1 < len(t) && t[i].text == "." {
				table.WriteString(".")
				i++
				continue
			}
			break
		}
		if i < len(t) && t[i].text == "*" {
			i++
		}
		// Actions are separated by commas outside parentheses.
		depth := 0
		actionStart := true
		for ; i < len(t); i++ {
			tk := t[i]
			switch tk.text {
			case "(":
				depth++
			case ")":
				depth--
			case ",":
				if depth == 0 {
					actionStart = true
					continue
				}
			}
			if !actionStart {
				continue
			}
			actionStart = false
			if tk.upper() != "DROP" {
				continue
			}
			j := i + 1
			if j < len(t) && t[j].upper() == "CONSTRAINT" {
				continue
			}
			if j < len(t) && t[j].upper() == "COLUMN" {
				j++
			}
			if j+1 < len(t) && t[j].upper() == "IF" && t[j+1].upper() == "EXISTS" {
				j += 2
			}
			if j < len(t) {
				if col, ok := t[j].ident(); ok {
					out = append(out, DropColumn{Stmt: st, Table: table.String(), TableName: last, Column: col})
				}
			}
		}
	}
	return out
}

// Finding is a dropped column that recorded statements still use.
type Finding struct {
	Drop       DropColumn
	Statements int    // distinct statements seen
	Calls      int64  // their calls
	Example    string // one of them, shortened
	Since      string // stats_reset, when known
}

func (f Finding) String() string {
	since := ""
	if f.Since != "" {
		since = " since " + f.Since
	}
	return fmt.Sprintf("%s drops %s.%s, which %d statement(s) recorded by pg_stat_statements%s use (%d calls), e.g. %q",
		f.Drop.Stmt, f.Drop.TableName, f.Drop.Column, f.Statements, since, f.Calls, f.Example)
}

var ddlPrefix = regexp.MustCompile(`(?i)^\s*(ALTER|CREATE|DROP|COMMENT|GRANT|REVOKE|ANALYZE|VACUUM|REINDEX|CLUSTER|TRUNCATE)\b`)

func wordRE(name string) *regexp.Regexp {
	return regexp.MustCompile(`(?i)(^|[^[:alnum:]_$])"?` + regexp.QuoteMeta(name) + `"?([^[:alnum:]_$]|$)`)
}

// Guard looks up, in pg_stat_statements, statements of this database that
// mention both a dropped column's table and the column (a textual match on
// word boundaries; DDL is ignored). pg_stat_statements keeps no per-statement
// timestamps: what it holds covers the time since its last reset
// (pg_stat_statements_info.stats_reset, PostgreSQL 14+). When that is shorter
// than window, the note says the evidence covers less than asked. The note
// also says when the extension is absent or not loaded. A database error
// other than those is returned.
func Guard(ctx context.Context, conn *pgx.Conn, drops []DropColumn, window time.Duration) (findings []Finding, note string, err error) {
	var schema string
	err = conn.QueryRow(ctx, `SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
		WHERE e.extname = 'pg_stat_statements'`).Scan(&schema)
	if err == pgx.ErrNoRows {
		return nil, "pg_stat_statements is not installed in this database, so the DROP COLUMN statements cannot be checked against recorded queries", nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("contract guard: %w", err)
	}
	view := pgsql.QualifiedName{Schema: schema, Name: "pg_stat_statements"}.Quoted()
	info := pgsql.QualifiedName{Schema: schema, Name: "pg_stat_statements_info"}.Quoted()
	var since string
	var recent bool
	if err := conn.QueryRow(ctx, `SELECT to_char(stats_reset AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
		stats_reset > now() - make_interval(secs => $1) FROM `+info, window.Seconds()).Scan(&since, &recent); err != nil {
		if pgsql.Code(err) == "55000" { // not loaded via shared_preload_libraries
			return nil, "pg_stat_statements is installed but not loaded (shared_preload_libraries), so the DROP COLUMN statements cannot be checked against recorded queries", nil
		}
		since, recent = "", false // before PostgreSQL 14: no stats_reset
	}
	if recent && window > 0 {
		note = fmt.Sprintf("pg_stat_statements was reset at %s: its history is shorter than --window %s", since, window)
	}
	for _, d := range drops {
		rows, err := conn.Query(ctx, `SELECT query, calls FROM `+view+`
			WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
			  AND strpos(lower(query), $1) > 0 AND strpos(lower(query), $2) > 0`,
			strings.ToLower(d.TableName), strings.ToLower(d.Column))
		if err != nil {
			if pgsql.Code(err) == "55000" {
				return nil, "pg_stat_statements is installed but not loaded (shared_preload_libraries), so the DROP COLUMN statements cannot be checked against recorded queries", nil
			}
			return nil, "", fmt.Errorf("contract guard: read pg_stat_statements: %w", err)
		}
		f := Finding{Drop: d, Since: since}
		tRE, cRE := wordRE(d.TableName), wordRE(d.Column)
		for rows.Next() {
			var q string
			var calls int64
			if err := rows.Scan(&q, &calls); err != nil {
				rows.Close()
				return nil, "", fmt.Errorf("contract guard: %w", err)
			}
			if ddlPrefix.MatchString(q) || strings.Contains(q, "pg_stat_statements") || !tRE.MatchString(q) || !cRE.MatchString(q) {
				continue
			}
			f.Statements++
			f.Calls += calls
			if f.Example == "" {
				f.Example = strings.Join(strings.Fields(q), " ")
				if len(f.Example) > 160 {
					f.Example = f.Example[:157] + "..."
				}
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, "", fmt.Errorf("contract guard: %w", err)
		}
		if f.Statements > 0 {
			findings = append(findings, f)
		}
	}
	return findings, note, nil
}
