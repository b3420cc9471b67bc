import * as api from '../api.js';
import { h, note, errorText } from '../ui.js';

export function renderSignIn(main) {
  const message = h('div', { 'aria-live': 'polite' });
  const username = h('input', { id: 'username', name: 'username', autocomplete: 'username', required: true, maxlength: 64 });
  const password = h('input', { id: 'password', name: 'password', type: 'password', autocomplete: 'current-password', required: true, maxlength: 256 });
  const submit = h('button', { type: 'submit', id: 'signin', class: 'primary' }, 'Sign in');
  const form = h('form', { class: 'card signin', onsubmit: async (event) => {
    event.preventDefault();
    submit.disabled = true;
    message.replaceChildren();
    try {
      const answer = await api.post('/api/auth/login', { username: username.value, password: password.value });
      api.storeLogin(answer);
      location.hash = api.takeReturn();
    } catch (error) {
      const text = error.status === 401 ? 'Wrong username or password.' : errorText(error);
      message.replaceChildren(note('error', text));
      submit.disabled = false;
      password.select();
    }
  } },
  h('h1', { text: 'Sign in to Drover' }),
  h('label', { for: 'username' }, 'Username'), username,
  h('label', { for: 'password' }, 'Password'), password,
  submit, message,
  h('p', { class: 'muted small' }, 'The first administrator\'s password is printed when the server starts for the first time.'));
  main.append(form);
  username.focus();
}
