// Renders Ollama Modelfile TEMPLATEs the way Ollama executes a template that uses .Messages: Go's text/template
// with missingkey=zero, .System = the system messages joined by blank lines, .Messages = the conversation.
// Reads a JSON list of {"template", "messages": [{"role", "content"}]} on stdin, writes a JSON list of strings
// (or of "ERROR: ..." lines) on stdout. Used by tests/test_gguf.py.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func render(c Case) string {
	tmpl, err := template.New("").Option("missingkey=zero").Parse(c.Template)
	if err != nil {
		return "ERROR: " + err.Error()
	}
	var system []string
	for _, m := range c.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	var out strings.Builder
	data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": c.Messages, "Response": ""}
	if err := tmpl.Execute(&out, data); err != nil {
		return "ERROR: " + err.Error()
	}
	return out.String()
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	results := make([]string, len(cases))
	for i, c := range cases {
		results[i] = render(c)
	}
	json.NewEncoder(os.Stdout).Encode(results)
}
