package main

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
	"gopkg.in/yaml.v3"
)

type workflow struct {
	Name string                 `yaml:"name"`
	On   map[string]any         `yaml:"on"`
	Jobs map[string]workflowJob `yaml:"jobs"`
}

type workflowJob struct {
	Needs any            `yaml:"needs"`
	Steps []workflowStep `yaml:"steps"`
}

type workflowStep struct {
	Name string `yaml:"name"`
	Uses string `yaml:"uses"`
	Run  string `yaml:"run"`
}

func TestExampleWorkflowUsesOnlyRealCommands(t *testing.T) {
	path := filepath.Join("..", "..", "examples", "github-actions", "migrate.yml")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var wf workflow
	if err := yaml.Unmarshal(raw, &wf); err != nil {
		t.Fatalf("%s is not valid YAML: %v", path, err)
	}
	if len(wf.On) == 0 || len(wf.Jobs) < 2 {
		t.Fatalf("%s: want triggers and at least two jobs, got %+v", path, wf)
	}
	deploy, ok := wf.Jobs["deploy"]
	if !ok || !needs(deploy.Needs, "migrate") {
		t.Fatalf("the deploy job must need the migrate job (needs: %v)", deploy.Needs)
	}
	app := newApp()
	globals := map[string]bool{}  // global flags that take a value
	for _, f := range app.Flags { // all global flags here take a value except help
		for _, n := range f.Names() {
			globals["--"+n] = true
		}
	}
	seen := map[string]int{}
	for jobName, job := range wf.Jobs {
		for _, step := range job.Steps {
			if step.Uses == "" && step.Run == "" {
				t.Errorf("job %s, step %q: neither uses nor run", jobName, step.Name)
			}
			for _, inv := range invocations(step.Run) {
				args := shellWords(inv)
				// Skip global flags to find the subcommand.
				i := 0
				for i < len(args) && strings.HasPrefix(args[i], "-") {
					if !strings.Contains(args[i], "=") && globals[args[i]] {
						i++
					}
					i++
				}
				if i >= len(args) {
					t.Errorf("job %s, step %q: `shadowctl %s` names no subcommand", jobName, step.Name, inv)
					continue
				}
				name := args[i]
				seen[name]++
				cmd := app.Command(name)
				if cmd == nil {
					t.Errorf("job %s, step %q: `shadowctl %s` is not a command", jobName, step.Name, name)
					continue
				}
				for _, a := range args[i+1:] {
					if a == "--" {
						break
					}
					if !strings.HasPrefix(a, "--") {
						continue
					}
					flag, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
					if !hasFlag(cmd, flag) {
						t.Errorf("job %s, step %q: `shadowctl %s` has no flag --%s", jobName, step.Name, name, flag)
					}
				}
			}
		}
	}
	for _, want := range []string{"lock", "check"} {
		if seen[want] == 0 {
			t.Errorf("the example never runs `shadowctl %s`", want)
		}
	}
}

func needs(v any, job string) bool {
	switch n := v.(type) {
	case string:
		return n == job
	case []any:
		for _, x := range n {
			if x == job {
				return true
			}
		}
	}
	return false
}

func hasFlag(cmd *cli.Command, name string) bool {
	for _, f := range cmd.Flags {
		for _, n := range f.Names() {
			if n == name {
				return true
			}
		}
	}
	return name == "help" || name == "h"
}

var shadowctlCall = regexp.MustCompile(`(?:^|[\s;&|(])shadowctl\s+([^\n;&|]*)`)

// invocations returns the argument text of each `shadowctl ...` in a run
// script.
func invocations(run string) []string {
	var out []string
	for _, m := range shadowctlCall.FindAllStringSubmatch(run, -1) {
		out = append(out, strings.TrimSpace(m[1]))
	}
	return out
}

// shellWords splits like a POSIX shell would for simple quoted words.
func shellWords(s string) []string {
	var words []string
	var cur strings.Builder
	inWord := false
	var quote rune
	for _, r := range s {
		switch {
		case quote != 0 && r == quote:
			quote = 0
		case quote != 0:
			cur.WriteRune(r)
		case r == '"' || r == '\'':
			quote, inWord = r, true
		case r == ' ' || r == '\t' || r == '\n':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

func TestInvocationsAndWords(t *testing.T) {
	got := invocations("go install github.com/shadowctl/shadowctl/cmd/shadowctl@latest\nshadowctl check --column a.b && shadowctl --dsn x wait --phase ready")
	if len(got) != 2 || got[0] != "check --column a.b" || got[1] != "--dsn x wait --phase ready" {
		t.Fatalf("invocations: %q", got)
	}
	if w := shellWords(`backfill --set "a = b.c" --where 'x = 1'`); len(w) != 5 || w[2] != "a = b.c" || w[4] != "x = 1" {
		t.Fatalf("shellWords: %q", w)
	}
}
