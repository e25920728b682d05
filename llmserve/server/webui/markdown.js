// Markdown → DOM for model answers, and a small code highlighter.
//
// Builds elements and text nodes only (never innerHTML), so nothing a model writes can become
// markup or script; links keep only http(s) and mailto targets. It covers what chat models
// write — headings, paragraphs, lists, block quotes, fenced code, tables, rules, and inline code,
// bold, italics, strike-through and links — and renders a half-streamed answer sensibly (an
// unclosed code fence is code up to the end).
"use strict";

(function () {
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- inline ---------------------------------------------------------------------------------

  // The earliest match wins; among matches at one place, the first pattern listed.
  const INLINE = [
    { kind: "code", re: /(`+)([\s\S]*?[^`])\1(?!`)/y },
    { kind: "link", re: /\[([^\]\n]+)\]\(\s*<?([^\s)>]+)>?(?:\s+"[^"]*")?\s*\)/y },
    { kind: "autolink", re: /<?(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])>?/y },
    { kind: "strong", re: /\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__(?!\w)/y },
    { kind: "del", re: /~~(?=\S)([\s\S]*?\S)~~/y },
    { kind: "em", re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*(?!\*)|(?<!\w)_(?=\S)([\s\S]*?\S)_(?!\w)/y },
  ];
  const INLINE_START = /[`\[*_~<h]/g;

  function safeHref(url) {
    return /^(https?:|mailto:)/i.test(url) ? url : null;
  }

  function inline(text, parent) {
    let plain = "";
    const flush = () => {
      if (plain) appendText(parent, plain);
      plain = "";
    };
    let i = 0;
    while (i < text.length) {
      INLINE_START.lastIndex = i;
      const next = INLINE_START.exec(text);
      if (!next) break;
      plain += text.slice(i, next.index);
      i = next.index;
      let matched = null;
      for (const rule of INLINE) {
        rule.re.lastIndex = i;
        const m = rule.re.exec(text);
        if (m) {
          matched = { rule, m };
          break;
        }
      }
      if (!matched) {
        plain += text[i];
        i += 1;
        continue;
      }
      flush();
      const { rule, m } = matched;
      i += m[0].length;
      if (rule.kind === "code") {
        parent.appendChild(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
      } else if (rule.kind === "link" || rule.kind === "autolink") {
        const href = safeHref(rule.kind === "link" ? m[2] : m[1]);
        const a = href ? el("a") : null;
        if (a) {
          a.href = href;
          a.rel = "noopener noreferrer";
          a.target = "_blank";
          parent.appendChild(a);
        }
        if (rule.kind === "link") inline(m[1], a || parent);
        else (a || parent).appendChild(document.createTextNode(m[1]));
      } else {
        const node = el(rule.kind === "del" ? "del" : rule.kind);
        inline(m[1] !== undefined ? m[1] : m[2], node);
        parent.appendChild(node);
      }
    }
    plain += text.slice(i);
    flush();
  }

  // A line break inside a paragraph is kept (models mean them).
  function appendText(parent, text) {
    const lines = text.split("\n");
    lines.forEach((line, n) => {
      if (n > 0) parent.appendChild(el("br"));
      if (line) parent.appendChild(document.createTextNode(line));
    });
  }

  // -- blocks ---------------------------------------------------------------------------------

  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}> ?/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function startsBlock(line, nextLine) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line) || (line.includes("|") && nextLine !== undefined && TABLE_SEP.test(nextLine));
  }

  function cells(line) {
    let row = line.trim();
    if (row.startsWith("|")) row = row.slice(1);
    if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
    return row.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
  }

  function blocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        i += 1;
        continue;
      }
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i += 1;
        while (i < lines.length && !new RegExp("^ {0,3}" + fence[0] + "{" + fence.length + ",}\\s*$").test(lines[i])) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1; // the closing fence (or past the end while it streams)
        parent.appendChild(codeBlock(body.join("\n"), m[2]));
      } else if ((m = HEADING.exec(line))) {
        const h = el("h" + Math.min(m[1].length + 1, 6));
        inline(m[2], h);
        parent.appendChild(h);
        i += 1;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i += 1;
      } else if (QUOTE.test(line)) {
        const inner = [];
        while (i < lines.length && lines[i].trim() && QUOTE.test(lines[i])) {
          inner.push(lines[i].replace(QUOTE, ""));
          i += 1;
        }
        const quote = el("blockquote");
        blocks(inner, quote);
        parent.appendChild(quote);
      } else if (ITEM.test(line)) {
        i = list(lines, i, parent);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const table = el("table");
        const head = el("thead");
        const tr = el("tr");
        for (const c of cells(line)) {
          const th = el("th");
          inline(c, th);
          tr.appendChild(th);
        }
        head.appendChild(tr);
        table.appendChild(head);
        const body = el("tbody");
        i += 2;
        while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
          const row = el("tr");
          for (const c of cells(lines[i])) {
            const td = el("td");
            inline(c, td);
            row.appendChild(td);
          }
          body.appendChild(row);
          i += 1;
        }
        table.appendChild(body);
        const wrap = el("div", "table-wrap");
        wrap.appendChild(table);
        parent.appendChild(wrap);
      } else {
        const para = [line.trim()];
        i += 1;
        while (i < lines.length && lines[i].trim() && !startsBlock(lines[i], lines[i + 1])) {
          para.push(lines[i].trim());
          i += 1;
        }
        const p = el("p");
        inline(para.join("\n"), p);
        parent.appendChild(p);
      }
    }
  }

  // One list from lines[start]; items' further lines are those indented past the marker.
  function list(lines, start, parent) {
    const first = ITEM.exec(lines[start]);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    let i = start;
    while (i < lines.length) {
      const m = ITEM.exec(lines[i]);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      i += 1;
      while (i < lines.length) {
        const line = lines[i];
        const leading = line.length - line.trimStart().length;
        if (!line.trim()) {
          // a blank line ends the item unless the next line is still indented under it
          const next = lines[i + 1];
          if (next !== undefined && next.trim() && next.length - next.trimStart().length > indent) {
            body.push("");
            i += 1;
            continue;
          }
          break;
        }
        if (leading <= indent && (ITEM.test(line) || startsBlock(line, lines[i + 1]))) break;
        body.push(line.slice(Math.min(leading, indent + 2)));
        i += 1;
      }
      const li = el("li");
      if (body.length === 1 && !startsBlock(body[0])) {
        inline(body[0], li);
      } else {
        blocks(body, li);
      }
      node.appendChild(li);
      while (i < lines.length && !lines[i].trim()) {
        const next = lines[i + 1];
        const nm = next === undefined ? null : ITEM.exec(next);
        if (!nm || nm[1].length !== indent) break;
        i += 1;
      }
    }
    parent.appendChild(node);
    return i;
  }

  // -- code -----------------------------------------------------------------------------------

  const KEYWORDS = {
    python: "and as assert async await break class continue def del elif else except finally for from global if import in is lambda nonlocal not or pass raise return try while with yield match case",
    js: "async await break case catch class const continue debugger default delete do else export extends finally for function if import in instanceof let new of return static super switch this throw try typeof var void while with yield",
    c: "auto break case char const continue default do double else enum extern float for goto if inline int long register return short signed sizeof static struct switch typedef union unsigned void volatile while class namespace template typename public private protected virtual using new delete this throw try catch bool",
    rust: "as async await break const continue crate dyn else enum extern fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait type unsafe use where while",
    go: "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var",
    java: "abstract boolean break byte case catch char class const continue default do double else enum extends final finally float for if implements import instanceof int interface long new package private protected public return short static super switch synchronized this throw throws try void volatile while var record",
    shell: "if then else elif fi for while until do done case esac in function return export local readonly set unset echo cd exit source",
    sql: "select from where insert into values update set delete create table drop alter index join left right inner outer on group by order having limit offset as and or not null primary key distinct union all",
  };
  const ALIASES = {
    py: "python", python3: "python", javascript: "js", ts: "js", typescript: "js", jsx: "js",
    tsx: "js", json: "js", node: "js", cpp: "c", "c++": "c", h: "c", hpp: "c", cs: "c",
    csharp: "c", rs: "rust", golang: "go", kotlin: "java", kt: "java", swift: "java",
    bash: "shell", sh: "shell", zsh: "shell", console: "shell", shell: "shell", ps1: "shell",
    toml: "shell", yaml: "shell", yml: "shell", ini: "shell", dockerfile: "shell", sql: "sql",
  };
  const HASH_COMMENTS = new Set(["python", "shell"]);
  const LITERALS = /^(true|false|null|undefined|None|True|False|nil|NULL|nullptr)$/;
  const keywordSets = {};

  function keywordsFor(lang) {
    if (!keywordSets[lang]) {
      const words = lang in KEYWORDS ? KEYWORDS[lang] : Object.values(KEYWORDS).join(" ");
      keywordSets[lang] = new Set(words.split(" "));
    }
    return keywordSets[lang];
  }

  function tokenPattern(lang) {
    const comments = HASH_COMMENTS.has(lang) ? "#[^\\n]*" :
      lang === "sql" ? "--[^\\n]*" : "\\/\\/[^\\n]*|\\/\\*[\\s\\S]*?(?:\\*\\/|$)";
    const strings = lang === "python" ? "\"\"\"[\\s\\S]*?(?:\"\"\"|$)|'''[\\s\\S]*?(?:'''|$)|" : "";
    return new RegExp(
      "(" + comments + ")|(" + strings + "\"(?:\\\\.|[^\"\\\\\\n])*\"?|'(?:\\\\.|[^'\\\\\\n])*'?|`(?:\\\\.|[^`\\\\])*`?)" +
      "|(\\b(?:0[xX][0-9a-fA-F_]+|\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?)\\b)|([A-Za-z_$][\\w$]*)(\\s*\\()?",
      "g");
  }

  function highlight(code, language) {
    const lang = ALIASES[language.toLowerCase()] || language.toLowerCase() || "any";
    const keywords = keywordsFor(lang);
    const out = document.createDocumentFragment();
    const re = tokenPattern(lang);
    let last = 0;
    let m;
    const span = (cls, text) => out.appendChild(el("span", "tok-" + cls, text));
    while ((m = re.exec(code))) {
      if (m.index > last) out.appendChild(document.createTextNode(code.slice(last, m.index)));
      if (m[1]) span("comment", m[1]);
      else if (m[2]) span("string", m[2]);
      else if (m[3]) span("number", m[3]);
      else if (m[4]) {
        if (keywords.has(m[4])) span("keyword", m[4]);
        else if (LITERALS.test(m[4])) span("literal", m[4]);
        else if (m[5]) span("fn", m[4]);
        else out.appendChild(document.createTextNode(m[4]));
        if (m[5]) out.appendChild(document.createTextNode(m[5]));
      }
      last = m.index + m[0].length;
      if (m[0].length === 0) re.lastIndex += 1;
    }
    if (last < code.length) out.appendChild(document.createTextNode(code.slice(last)));
    return out;
  }

  function codeBlock(code, language) {
    const wrap = el("div", "code-block");
    const bar = el("div", "code-bar");
    bar.appendChild(el("span", "code-lang", language || "text"));
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy the " + (language || "code") + " block");
    copy.addEventListener("click", () => {
      navigator.clipboard.writeText(code).then(
        () => { copy.textContent = "Copied"; },
        () => { copy.textContent = "Copy failed"; });
    });
    bar.appendChild(copy);
    const pre = el("pre");
    const codeEl = el("code", language ? "language-" + language : null);
    codeEl.appendChild(highlight(code, language || ""));
    pre.appendChild(codeEl);
    wrap.appendChild(bar);
    wrap.appendChild(pre);
    return wrap;
  }

  function render(text) {
    const out = document.createDocumentFragment();
    blocks(text.replace(/\r\n?/g, "\n").split("\n"), out);
    return out;
  }

  window.llmMarkdown = { render, highlight };
})();
